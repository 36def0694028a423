"""kdlab's `conf/` outside a Hydra app: where it is, and what `python train.py <overrides>` would compose.

Tests, benchmarks and tools build tasks and runs from the same YAML as `train.py`, so each default lives in `conf/`
only (a task built in code starts from `conf/task/_defaults.yaml` like any `task=` option). `conf/` sits beside
`src/` (the editable install this project uses); with a copy of the package elsewhere, pass `config_dir`.
Imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def compose(overrides: Sequence[str] = (), config_dir: Path = CONF_DIR, config_name: str = "train") -> DictConfig:
    """The config `python train.py <overrides>` would run (or another primary config's), composed in-process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdlab.run.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=expand_overrides(overrides, config_dir))


def task_node(name: str = "arith", config_dir: Path = CONF_DIR, **overrides: Any) -> dict[str, Any]:
    """`task=<name>` with `task.<key>=<value>` for each override: the composed task node as a plain dict."""
    node = compose([f"task={name}"], config_dir).task
    return OmegaConf.to_container(OmegaConf.merge(node, overrides), resolve=True)


# -- short spellings ------------------------------------------------------------------------------------------------
# `student=` and `teacher=` pick model presets of the one `model` group (placed at `student` and `teacher`:
# `model@student`, `model@teacher`); the `teacher` group itself holds the other kinds of teacher (cached, remote,
# none, several). `teachers=` is the spelling several teachers had before they joined the `teacher` group.
ROLES = ("student", "teacher")
LEGACY = {"teachers": "teacher", "strategy": "trainer/strategy"}  # old group -> the group it became
LEGACY_KEYS = {"teachers": "teacher", "strategy": "trainer.strategy"}


def expand_overrides(overrides: Sequence[str], config_dir: Path = CONF_DIR) -> list[str]:
    """Command-line overrides in the config's own spelling: `student=X` -> `model@student=X`, `teacher=X` ->
    `model@teacher=X` where X is a model preset (conf/model/X.yaml; a comma list in a multirun), `teachers=X` ->
    `teacher=X`, `teachers.<key>=` -> `teacher.<key>=`, and the strategy's old group `strategy=X` ->
    `trainer/strategy=X`, `strategy.<key>=` -> `trainer.strategy.<key>=`. Everything else is left as written."""
    presets = {p.stem for p in (Path(config_dir) / "model").glob("*.yaml")}
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~", "-")):
            out.append(override)
            continue
        if key in ("teachers", "strategy"):
            out.append(f"{LEGACY[key]}={value}")
        elif key.split(".")[0] in ("teachers", "strategy"):
            head, _, rest = key.partition(".")
            out.append(f"{LEGACY_KEYS[head]}.{rest}={value}")
        elif key in ROLES and (value == "null" or all(v.strip() in presets for v in value.split(","))):
            out.append(f"model@{key}={value}")
        else:
            out.append(override)
    return out

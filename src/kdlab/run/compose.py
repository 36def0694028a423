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
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def task_node(name: str = "arith", config_dir: Path = CONF_DIR, **overrides: Any) -> dict[str, Any]:
    """`task=<name>` with `task.<key>=<value>` for each override: the composed task node as a plain dict."""
    node = compose([f"task={name}"], config_dir).task
    return OmegaConf.to_container(OmegaConf.merge(node, overrides), resolve=True)

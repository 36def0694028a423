"""Config resolvers and the labels they write: how a method, a sweep's group and a shipped asset are named.

Both a training job (`${kdlab.method:${loss}}` in a W&B run name) and `kdlab-report` (a table's row label) name a
loss the same way, so the names live here, in a module that imports no torch and neither of its users: the report
stays light and the config layer does not depend on the reporting one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from kdlab import ASSETS_DIR

# Loss parameters that name the method itself (GKD's jsd(beta), DistiLLM's skew alpha), so they go in its label.
LABEL_PARAMS = {"jsd": "beta", "skl": "alpha", "srkl": "alpha"}


def register_resolvers() -> None:
    """Register kdlab's OmegaConf resolvers (idempotent); a config that uses them resolves only after this.

    `${kdlab.asset:arith/teacher}`: absolute path of a file or folder shipped in `kdlab/assets/`;
    `${kdlab.concat:[a,b],${tags}}`: one list; `${kdlab.sweep_group:<name outside a multirun>}`: the W&B group;
    `${kdlab.method:${loss}}`: fkl, jsd(0.9), ...; `${kdlab.run_name:}`, `${kdlab.sweep_name:}`: a run's and a
    multirun's directory name (kdlab.run.record); `${kdlab.ot_variant:${.variant},<paper>,<released code>}`: the
    loss=ot setting of the chosen variant.
    """
    if not OmegaConf.has_resolver("kdlab.asset"):
        OmegaConf.register_new_resolver("kdlab.asset", lambda rel: str(ASSETS_DIR / rel))
    if not OmegaConf.has_resolver("kdlab.concat"):
        OmegaConf.register_new_resolver("kdlab.concat", lambda *lists: [x for part in lists for x in part])
    if not OmegaConf.has_resolver("kdlab.sweep_group"):
        OmegaConf.register_new_resolver("kdlab.sweep_group", _sweep_group)
    if not OmegaConf.has_resolver("kdlab.method"):
        OmegaConf.register_new_resolver("kdlab.method", _method_label)
    if not OmegaConf.has_resolver("kdlab.ot_variant"):  # `${kdlab.ot_variant:${.variant},0.15,1.5}` -> 0.15 or 1.5
        OmegaConf.register_new_resolver("kdlab.ot_variant", _ot_variant_value)
    if not OmegaConf.has_resolver("kdlab.run_name"):  # conf/hydra/default.yaml: the run directory's name
        OmegaConf.register_new_resolver("kdlab.run_name", _run_name)
    if not OmegaConf.has_resolver("kdlab.sweep_name"):
        OmegaConf.register_new_resolver("kdlab.sweep_name", _sweep_name)
    if not OmegaConf.has_resolver("kdlab.by_role"):  # `${kdlab.by_role:bfloat16,float32}` in a conf/model preset
        OmegaConf.register_new_resolver("kdlab.by_role", _by_role)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (`python train.py -m ...`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_group(default: str) -> str:
    """The jobs of one multirun share one W&B group, named after the sweep directory; a single run keeps `default`."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return default
    return sweep_group_name(HydraConfig.get().sweep.dir)


def _run_name(_root_: Any) -> str:
    from kdlab.run.record import run_name  # record builds on the labels here

    return run_name(_root_)


def _sweep_name(_root_: Any) -> str:
    from kdlab.run.record import sweep_name

    return sweep_name(_root_)


def _method_label(loss: Any) -> str:
    return method_label(OmegaConf.to_container(loss, resolve=True) if isinstance(loss, DictConfig) else loss)


def _by_role(frozen: Any, trained: Any, _parent_: Any) -> Any:
    """A model preset's setting by the role it is placed in (conf/model serves both): `trained` at `student`, `frozen`
    anywhere else (the teacher, a member of several teachers)."""
    return trained if _parent_._key() == "student" else frozen


def _ot_variant_value(variant: str, paper: Any, released_code: Any) -> Any:
    """A loss=ot setting that differs between the paper and the authors' released code: the one `variant` names.

    The setting stays an ordinary key of the resolved config (saved with every run); an explicit override wins.
    An unknown variant is reported by the config validation (kdlab.run.validate)."""
    return released_code if variant == "released_code" else paper


def method_label(loss: Mapping[str, Any] | None, extra_keys: Iterable[str] = ()) -> str:
    """How a table names a loss: `fkl`, `jsd(0.9)`, `skl(0.1)`; `extra_keys` are further loss keys a sweep varied,
    written out, e.g. `ot(top_k=20, gamma=0)`."""
    if not loss:
        return "none"
    name = str(loss.get("name", "?"))
    params = []
    own = LABEL_PARAMS.get(name)
    if own and loss.get(own) is not None:
        params.append(format_value(loss[own]))
    if loss.get("variant", "paper") != "paper":  # loss=ot as the authors' released code: `ot(released_code)`
        params.append(str(loss["variant"]))
    for key in extra_keys:
        if key not in (own, "name", "variant") and key in loss:
            params.append(f"{key}={format_value(loss[key])}")
    return f"{name}({', '.join(params)})" if params else name


def format_value(value: Any) -> str:
    """0.5 -> "0.5", 1.0 -> "1", 1e-4 -> "0.0001"; anything else as str."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.2g}"


def sweep_group_name(sweep_dir: str | Path) -> str:
    """The W&B group of a multirun's jobs, from its sweep directory: the path below `outputs/` (or its last two
    parts), e.g. `outputs/multirun/2026-11-25/15-14-06` -> `multirun-2026-11-25-15-14-06`."""
    parts = [p for p in Path(sweep_dir).parts if p not in ("/", ".", "..")]
    if "outputs" in parts:
        parts = parts[len(parts) - parts[::-1].index("outputs"):]
    parts = parts[-3:] or ["sweep"]
    return "-".join(parts)

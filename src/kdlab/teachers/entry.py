"""Hydra entry points of the teacher tools, composing the same `conf/` as `train.py`.

The tools take the run's own overrides (`teacher=...`, `task=...`), so the teacher they serve or cache is the one a
training run would load (`conf/` is found as kdlab.run.compose says; with a copy of the package elsewhere, pass
`--config-dir <repo>/conf`).
"""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from kdlab.run.compose import CONF_DIR


def hydra_entry(config_name: str, fn: Callable[[DictConfig], object]) -> None:
    """Run `fn(cfg)` under `hydra.main` with `conf/<config_name>.yaml` as the primary config."""
    import sys

    import hydra

    from kdlab.run.compose import expand_overrides
    from kdlab.run.resolvers import register_resolvers

    register_resolvers()
    sys.argv[1:] = expand_overrides(sys.argv[1:])  # `teacher=arith_teacher`: a conf/model/ preset at `teacher`
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(fn)()

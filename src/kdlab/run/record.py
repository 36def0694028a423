"""What a run says about itself: the name of its directory and the resolved choices its results.json records.

Runs of one day sit side by side in `outputs/runs/<date>/`; their names tell them apart at a glance (task, teacher and
student, loss, policy, what else was switched on, tags), and results.json answers what ran without reading the
config. Both read the composed config only: no torch, nothing loaded (Hydra names the directory before the job runs).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdlab.run.resolvers import format_value, method_label

MAX_NAME = 120  # characters of a run directory's name after its time stamp: well under any filesystem's limit
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")  # no '/', ',' (a Hydra sweep), '=', spaces, brackets or quotes


def safe(text: Any) -> str:
    """`text` as one readable piece of a path: unsafe characters become '-' (`jsd(0.5)` -> `jsd-0.5`)."""
    return UNSAFE.sub("-", str(text)).strip("-.") or "x"


def run_name(cfg: Mapping[str, Any]) -> str:
    """`<task>_<teacher>_to_<student>_<loss>_<policy>[_<reward>][_<tags>]`, e.g.
    `arith_arith-teacher_to_arith-student_jsd-0.5_mixed-0.5`; a LoRA student reads `<student>-lora16`, several teachers
    `a+b`, a teacher outside the process `cached` or `remote`, none `no-teacher`."""
    cfg = _plain(cfg)
    if not cfg.get("task") or not cfg.get("policy"):  # Hydra's own node alone (`--cfg hydra`): no job to name
        return "run"
    parts = [safe(cfg["task"]["name"]), f"{_teacher_label(cfg.get('teacher'))}_to_{_student_label(cfg.get('student'))}",
             safe(method_label(cfg.get("loss"))), safe(_policy_label(cfg["policy"]))]
    if cfg.get("reward"):
        parts.append("reward-" + safe(_reward_name(cfg)))
    tags = [safe(t) for t in cfg.get("tags") or []]
    if tags:
        parts.append("-".join(tags))
    return "_".join(parts)[:MAX_NAME]


def sweep_name(cfg: Mapping[str, Any]) -> str:
    """A multirun's directory: its task and tags (what its jobs vary is in each job's own name and overrides)."""
    cfg = _plain(cfg)
    if not cfg.get("task"):
        return "sweep"
    return "_".join([safe(cfg["task"]["name"]), *(safe(t) for t in cfg.get("tags") or [])])[:MAX_NAME]


def run_choices(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The choices of a run as results.json records them: teacher (kind, name; its members when several), student,
    loss (name, label and settings), policy (name, student fraction lambda), reward, LoRA, sampling engine, tags."""
    cfg = _plain(cfg)
    student = cfg.get("student") or {}
    lora = student.get("lora") or {}
    policy = cfg["policy"]
    return {
        "task": cfg["task"]["name"],
        "teacher": _teacher_choice(cfg.get("teacher")),
        "student": {"name": student.get("name"), "path": student.get("path")},
        "loss": {"name": (cfg.get("loss") or {}).get("name"), "label": method_label(cfg.get("loss")),
                 **_settings(cfg.get("loss") or {})},
        "policy": {"name": policy.get("name"), "student_fraction": float(policy.get("student_fraction", 0.0)),
                   "fixed_source": policy.get("fixed_source")},
        "reward": None if not cfg.get("reward") else {"name": _reward_name(cfg), **_settings(cfg["reward"])},
        "lora": {k: lora[k] for k in ("r", "alpha", "dropout", "target_modules") if k in lora}
        if int(lora.get("r") or 0) > 0 else None,
        "sampling_engine": (policy.get("sampling") or {}).get("engine") or "hf",
        "tags": list(cfg.get("tags") or []),
    }


# -- labels -----------------------------------------------------------------------------------------------------------
def _model_label(node: Mapping[str, Any] | None) -> str:
    if not node:
        return "none"
    name = node.get("name") or node.get("path") or "model"
    return safe(PurePosixPath(str(name)).name)  # a hub id's model part: Qwen/Qwen3-0.6B -> Qwen3-0.6B


def _teacher_label(node: Mapping[str, Any] | None) -> str:
    if node is None:
        return "no-teacher"
    kind = node.get("kind") or "model"
    if kind == "several":
        return "+".join(_model_label(m) if (m or {}).get("kind", "model") == "model" else safe(m.get("kind"))
                        for m in (node.get("members") or {}).values())
    return _model_label(node) if kind == "model" else safe(kind)


def _student_label(node: Mapping[str, Any] | None) -> str:
    label = _model_label(node)
    r = int(((node or {}).get("lora") or {}).get("r") or 0)
    return f"{label}-lora{r}" if r > 0 else label


def _policy_label(policy: Mapping[str, Any]) -> str:
    fraction = float(policy.get("student_fraction", 0.0))
    name = str(policy.get("name", "policy"))
    return f"{name}-{format_value(fraction)}" if 0.0 < fraction < 1.0 else name


def _reward_name(cfg: Mapping[str, Any]) -> str:
    """The reward's option name (`reward=arith_correct`) where Hydra knows it, else its function's class name."""
    choice = ((cfg.get("hydra") or {}).get("runtime") or {}).get("choices", {}).get("reward")
    if choice and choice != "none":
        return str(choice)
    target = str(((cfg.get("reward") or {}).get("fn") or {}).get("_target_", "reward"))
    return target.rsplit(".", 1)[-1]


def _teacher_choice(node: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if node is None:
        return None
    kind = node.get("kind") or "model"
    if kind == "model":
        return {"kind": "model", "name": node.get("name"), "path": node.get("path")}
    if kind == "several":
        return {"kind": "several", "name": node.get("name"), "combine": node.get("combine"),
                "weights": node.get("weights"), "routes": node.get("routes"),
                "members": {name: _teacher_choice(member) for name, member in (node.get("members") or {}).items()}}
    keep = {"cached": ("name", "dir", "top_k"), "remote": ("name", "url", "model", "top_k")}.get(kind, ("name",))
    return {"kind": kind, **{k: node.get(k) for k in keep}}


def _settings(node: Mapping[str, Any]) -> dict[str, Any]:
    """A node's own scalar settings (not its function's `_target_`/`_partial_`, not nested nodes)."""
    return {k: v for k, v in node.items() if not k.startswith("_") and k != "name"
            and (v is None or isinstance(v, (str, int, float, bool)))}


KEYS = ("task", "teacher", "student", "loss", "policy", "reward", "tags")


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a name and the choices read, as plain containers, and Hydra's choices where there are any. Only these
    resolve: Hydra names the run directory before `output_dir` and the rest of its own node can resolve."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    out = {}
    for key in KEYS:
        value = cfg.get(key)
        out[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    if choices is None:  # a job's own config has no hydra node; its choices are Hydra's while it runs
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else None
    if choices is not None:
        out["hydra"] = {"runtime": {"choices": OmegaConf.to_container(choices, resolve=False)}}
    return out

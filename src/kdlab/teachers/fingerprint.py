"""Fingerprints that say whether two teachers, tokenizers or training sets are the same, as short hex digests.

A cache or a server is only usable by a run whose teacher, token ids and scored targets are those it was built
from; comparing digests (and, for task settings, the settings themselves) lets a mismatch be named at start-up.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

# Task keys that change which tokens are scored; the others (batch sizes, evaluation, metric) do not touch a cache.
TASK_KEYS_IGNORED = frozenset({"batch_size", "eval_batch_size", "eval_examples", "generation", "metric", "metric_key",
                               "val_size"})


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Digest of the string -> id map and the special ids: equal exactly when token ids mean the same strings."""
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    return _digest({"vocab": sorted(tokenizer.get_vocab().items()), "special": special})


def model_fingerprint(model: torch.nn.Module) -> str:
    """Digest of every parameter and buffer, by name, shape, dtype and bytes (weights, not the path they came from)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def task_settings(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The task's config without the keys that do not change the scored targets (TASK_KEYS_IGNORED), as plain
    JSON-able values (an OmegaConf list and a Python list compare equal)."""
    def plain(value: Any) -> Any:
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value

    return {key: plain(value) for key, value in dict(task_cfg).items() if key not in TASK_KEYS_IGNORED}


def data_fingerprint(examples: Iterable[tuple[Sequence[int], Sequence[int]]]) -> str:
    """Digest of the (prompt ids, target ids) pairs in order: the exact token streams a cache scores."""
    h = hashlib.sha256()
    for prompt, target in examples:
        h.update(json.dumps([list(prompt), list(target)]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def settings_difference(cached: Mapping[str, Any], run: Mapping[str, Any], prefix: str) -> str | None:
    """The first differing key of two flat-ish settings dicts, as `prefix.key is A in the cache, B in the run`."""
    for key in sorted(set(cached) | set(run)):
        a, b = cached.get(key, "<unset>"), run.get(key, "<unset>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            return f"{prefix}.{key} is {a!r} in the cache, {b!r} in this run"
    return None

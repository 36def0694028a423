"""Divergences by name, as configs spell them (`loss.name: jsd`)."""

from __future__ import annotations

import inspect
from typing import Callable

from kdlab.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

DIVERGENCES: dict[str, Callable] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skl": skew_forward_kl,
    "srkl": skew_reverse_kl,
}
SAME_VOCAB_LOSSES = frozenset(DIVERGENCES)
_COMMON_PARAMS = {"temperature", "reduction", "chunk_size"}


def get_divergence(name: str) -> Callable:
    """The divergence function registered under `name`."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(sorted(DIVERGENCES))}") from None


def divergence_params(name: str) -> set[str]:
    """The keyword params `name` takes beyond temperature/reduction/chunk_size, e.g. {"beta"} for jsd."""
    params = inspect.signature(get_divergence(name)).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY} - _COMMON_PARAMS

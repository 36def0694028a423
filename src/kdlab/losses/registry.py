"""Divergences by name, as configs spell them (`loss.name: jsd`)."""

from __future__ import annotations

import inspect
from typing import Callable

from kdlab.losses.cross_tokenizer import multilevel_ot, universal_logit_distillation
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

# Losses between different tokenizers: each maps to its function and the config keys that weight its terms
# (total = ce_weight * CE + weighted terms; see kdlab.losses.objective).
CROSS_TOKENIZER_LOSSES: dict[str, Callable] = {"ot": multilevel_ot, "uld": universal_logit_distillation}
CROSS_TOKENIZER_WEIGHTS: dict[str, set[str]] = {"ot": {"alpha", "had_weight", "beta", "gamma"}, "uld": {"uld_weight"}}


def cross_tokenizer_params(name: str) -> set[str]:
    """The config keys of cross-tokenizer loss `name` beyond temperature: its function's knobs and its weights."""
    fn = CROSS_TOKENIZER_LOSSES[name]
    params = inspect.signature(fn).parameters.values()
    own = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY} - {"temperature", "components"}
    return own | CROSS_TOKENIZER_WEIGHTS[name]


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

"""`teacher=remote`: a teacher server (`kdlab-serve-teacher`, or `vllm serve`) scoring every target token.

The server answers the top-k log-probabilities of each target token of the batch's rows, ground truth or the
student's own samples (so on-policy works), through kdlab.teachers.client.TeacherClient; the step trains on the top-k
form of its divergence (kdlab.losses.sparse). With `targets_only` (loss=rkl_sampled) it asks for the log-probability
of each target token alone (`prompt_logprobs` 0: one entry per token instead of k + 1), and counts the bytes each
answer took: the step logs them per scored token (`train/teacher_bytes_per_token`). A server scores sequences, it
does not sample them: SeqKD from a server is refused at start-up (kdlab.teachers.build).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from torch import Tensor, nn

from kdlab.data.batch import Batch
from kdlab.losses.sampled import TokenLogprobs
from kdlab.losses.sparse import TopK
from kdlab.sampling.base import SamplingSettings
from kdlab.teachers.cached import OUTSIDE_REASON, padded_top_k

log = logging.getLogger(__name__)


class RemoteTeacher:
    """A teacher server's top-k of every target token of a batch's rows (see the module doc)."""

    models: list[nn.Module] = []
    tokenizer = None
    in_process = False
    generates = False

    def __init__(self, client: Any, name: str = "remote", targets_only: bool = False):
        self.client, self.name = client, name  # kdlab.teachers.client.TeacherClient, checked at start-up
        self.targets_only = targets_only
        self.received_bytes = self.scored_tokens = 0  # answers' sizes and the target tokens they scored, so far

    def fused_reason(self) -> str | None:
        return OUTSIDE_REASON

    def prepare(self, batch: Batch) -> TopK | TokenLogprobs:
        """The server's answer for every target token (may raise kdlab.teachers.client.TeacherLost)."""
        side = batch.student
        prompts, targets = _rows(*side.prompt), _rows(*side.target)
        if self.targets_only:
            return self._target_logprobs(side, prompts, targets)
        answer = self.client.target_top_k(prompts, targets)
        rows = [(answer.logprobs[b, :n], answer.ids[b, :n], answer.tail[b, :n])
                for b, n in enumerate(len(t) for t in targets)]
        return padded_top_k(rows, side.target_mask, self.client.k)

    def _target_logprobs(self, side: Any, prompts: list[list[int]], targets: list[list[int]]) -> TokenLogprobs:
        before = self.client.received_bytes
        values, _ = self.client.target_logprobs(prompts, targets)
        size = self.client.received_bytes - before
        logprobs = side.target_ids.new_zeros(side.target_ids.shape, dtype=values.dtype)
        for b, n in enumerate(len(t) for t in targets):  # targets are a row's unpadded tokens: its first n columns
            logprobs[b, :n] = values[b, :n].to(logprobs.device)
        tokens = sum(len(t) for t in targets)
        if not self.scored_tokens:
            log.info("teacher=remote, token log-probabilities only (prompt_logprobs 0): %.0f bytes per target token "
                     "in the first answer (train/teacher_bytes_per_token logs every step)", size / max(1, tokens))
        self.received_bytes += size
        self.scored_tokens += tokens
        return TokenLogprobs(logprobs, side.target_ids, received_bytes=size)

    def scores(self, batch: Batch, prepared: TopK | TokenLogprobs, want: str = "logits", groups: int = 1,
               then: Callable[[Any], Any] | None = None) -> Any:
        return then(prepared) if then is not None else prepared

    def sample(self, batch: Batch, settings: SamplingSettings, lockstep: bool = False) -> tuple[Tensor, Tensor]:
        raise ValueError("teacher=remote cannot sample: a server scores sequences (refused at start-up)")


def _rows(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """Each row's tokens without its padding."""
    return [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.bool().cpu())]

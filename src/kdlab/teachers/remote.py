"""`teacher=remote`: a teacher server (`kdlab-serve-teacher`, or `vllm serve`) scoring every target token.

The server answers the top-k log-probabilities of each target token of the batch's rows, ground truth or the
student's own samples (so on-policy works), through kdlab.teachers.client.TeacherClient; the step trains on the top-k
form of its divergence (kdlab.losses.sparse). A server scores sequences, it does not sample them: SeqKD from a
server is refused at start-up (kdlab.teachers.build).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from kdlab.data.batch import Batch
from kdlab.losses.sparse import TopK
from kdlab.sampling.base import SamplingSettings
from kdlab.teachers.cached import OUTSIDE_REASON, padded_top_k


class RemoteTeacher:
    """A teacher server's top-k of every target token of a batch's rows (see the module doc)."""

    models: list[nn.Module] = []
    tokenizer = None
    in_process = False
    generates = False

    def __init__(self, client: Any, name: str = "remote"):
        self.client, self.name = client, name  # kdlab.teachers.client.TeacherClient, checked at start-up

    def fused_reason(self) -> str | None:
        return OUTSIDE_REASON

    def prepare(self, batch: Batch) -> TopK:
        """The server's answer for every target token (may raise kdlab.teachers.client.TeacherLost)."""
        side = batch.student
        prompts, targets = _rows(*side.prompt), _rows(*side.target)
        answer = self.client.target_top_k(prompts, targets)
        rows = [(answer.logprobs[b, :n], answer.ids[b, :n], answer.tail[b, :n])
                for b, n in enumerate(len(t) for t in targets)]
        return padded_top_k(rows, side.target_mask, self.client.k)

    def scores(self, batch: Batch, prepared: TopK, want: str = "logits", groups: int = 1,
               then: Callable[[Any], Any] | None = None) -> Any:
        return then(prepared) if then is not None else prepared

    def sample(self, batch: Batch, settings: SamplingSettings, lockstep: bool = False) -> tuple[Tensor, Tensor]:
        raise ValueError("teacher=remote cannot sample: a server scores sequences (refused at start-up)")


def _rows(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """Each row's tokens without its padding."""
    return [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.bool().cpu())]

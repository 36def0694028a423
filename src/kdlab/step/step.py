"""The distillation step without Lightning: targets -> scores -> terms -> one normalised loss (GKD Algorithm 1).

`DistillationStep` holds the student, its tokenizer and sampler, the teacher (kdlab.teachers.base.Teacher, or None),
the objective and the reward, and answers what one optimizer step needs, in the order it needs it:

    targets(batch, source)      the micro-batch's targets: its own (ground truth), the student's samples or the
                                teacher's, or interleaved ones (policy=speculative: the student's proposals, the
                                teacher's replacements, kdlab.sampling.speculative), crossed to the other tokenizer
                                through text where the teacher has its own;
                                with a reward, k samples per prompt and their advantages; and what the teacher must
                                read before any backward (a cache's rows, a server's answers: may raise TeacherLost)
    global_counts(window)       each unit's count over the accumulation window and every process (one all-reduce)
    loss(targets, counts)       this micro-batch's share of the global loss, and of each logged value

A micro-batch's terms come from the logits path (`scored` + Objective.terms) or, with `fused`, from hidden states
and the output layers (kdlab.step.fused: no logits tensor). Validation's loss, rollouts and steps with a reward
(REINFORCE reads the student's log-probabilities of its samples) always take the logits path. The step never asks
which kind of teacher it holds: the teacher answers in the form asked for (`want`), and what it answers carries its
own shape (logits, a top-k, several members).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kdlab.data.batch import Batch, Side
from kdlab.evaluation.mismatch import own_output_sums
from kdlab.losses.normalisation import NONE, SEQUENCES, TOKENS, LossSum, normalised, unit_counts
from kdlab.losses.objective import Members, Objective
from kdlab.models.scoring import score_targets
from kdlab.models.sharding import world_size
from kdlab.sampling.base import Sampler, SamplingSettings
from kdlab.sampling.retokenize import response_texts, retokenize
from kdlab.sampling.speculative import SpeculativeSampler
from kdlab.step.policy import GROUND_TRUTH, SAMPLED_SOURCES, SPECULATIVE, STUDENT
from kdlab.step.rewards import RewardTerm, leave_one_out_advantages, policy_gradient_sum
from kdlab.teachers.base import LOGITS, Teacher, rows_of, with_vocab


@dataclass
class StepTargets:
    """What one micro-batch trains on: its rows with the step's targets on each side, where they came from, what the
    teacher read ahead for them, with a reward each sample's reward and advantage, on speculative steps which
    target tokens the teacher replaced, and counts logged per scored token (`stats`: a sum over this micro-batch
    each, logged as train/<name> divided by the global count of scored tokens)."""

    batch: Batch
    source: str = GROUND_TRUTH
    prepared: Any = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    replaced: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)

    def row(self, i: int) -> "StepTargets":
        """Row i alone, trimmed to its own padding as `Batch.split` trims it (a rollout's row)."""
        batch = self.batch.split(1)[i]
        width = batch.student.target_ids.shape[1]
        one = slice(i, i + 1)
        return StepTargets(batch, self.source, rows_of(self.prepared, i, i + 1, width),
                           self.rewards[one] if self.rewards is not None else None,
                           self.advantages[one] if self.advantages is not None else None,
                           self.replaced[one, :width] if self.replaced is not None else None)


class DistillationStep:
    """See the module doc. `fused` computes training terms from hidden states (kdlab.step.fused.fused_off_reason
    says when it can); `score_groups` is how many groups of rows of similar length a batch is scored in;
    `speculative` draws the targets of speculative steps (policy=speculative)."""

    def __init__(self, student: nn.Module, tokenizer: PreTrainedTokenizerBase, objective: Objective,
                 sampler: Sampler, teacher: Teacher | None = None, reward: RewardTerm | None = None,
                 fused: bool = False, score_groups: int = 1, speculative: SpeculativeSampler | None = None):
        if objective.needs_teacher and teacher is None:
            raise ValueError(f"loss={objective.name} compares the student with a teacher, but no teacher was given")
        if fused:
            from kdlab.step.fused import fused_off_reason

            reason = fused_off_reason(objective, student, teacher)
            if reason is not None:
                raise ValueError(f"the fused step cannot run here: {reason} (build it with fused=False)")
        self.student, self.tokenizer, self.objective, self.sampler = student, tokenizer, objective, sampler
        self.teacher, self.reward, self.fused, self.score_groups = teacher, reward, fused, score_groups
        self.speculative = speculative
        # Sharded models need every rank in each forward pass: one scoring group, and sampling in lockstep. Set by
        # the LightningModule once the strategy is known.
        self.sharded = False

    @property
    def groups(self) -> int:
        return 1 if self.sharded else self.score_groups

    @property
    def vocab(self) -> int:
        """The student's token columns: its tokenizer's (an output layer padded beyond it has rows that are no
        tokens)."""
        return len(self.tokenizer)

    # -- targets ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, batch: Batch, source: str, sampling: SamplingSettings, seed: int | None = None) -> StepTargets:
        """One micro-batch's targets from `source` (see the module doc). No gradient: sampling and reading only."""
        rewarded = source == STUDENT and self.reward is not None and self.reward.active
        if rewarded:
            batch = batch.repeat_rows(self.reward.samples_per_prompt)
        replaced, stats = None, {}
        if source == SPECULATIVE:
            if self.speculative is None:
                raise ValueError("a speculative step needs the step's speculative sampler (policy=speculative)")
            draw = self.speculative.interleaved(*batch.student.prompt, sampling, seed, lockstep=self.sharded)
            batch, replaced = self.crossed(batch, draw.ids, draw.mask, by_teacher=False), draw.replaced
            stats["speculative_accept"] = draw.accepted.sum().float()
        else:
            batch = self.sampled(batch, source, sampling, seed)
        prepared = self.teacher.prepare(batch) if self.objective.needs_teacher else None
        if getattr(prepared, "received_bytes", 0):  # a server's token log-probabilities: what they took to move
            stats["teacher_bytes_per_token"] = torch.tensor(float(prepared.received_bytes))
        targets = StepTargets(batch, source, prepared, replaced=replaced, stats=stats)
        if rewarded:
            texts, _ = response_texts(*batch.student.target, self.tokenizer)
            device = batch.student.target_ids.device
            targets.rewards = self.reward.score([t.strip() for t in texts], batch.reference).to(device)
            targets.advantages = leave_one_out_advantages(targets.rewards, self.reward.samples_per_prompt)
        return targets

    def sampled(self, batch: Batch, source: str, settings: SamplingSettings, seed: int | None = None) -> Batch:
        """`batch` with `source`'s targets: its own, or the student's or the teacher's continuations of its prompts.
        Samples of one tokenizer reach the other side through text."""
        if source == GROUND_TRUTH:
            return batch
        if source == STUDENT:
            ids, mask = self.sampler.sample(*batch.student.prompt, settings, seed, lockstep=self.sharded)
            return self.crossed(batch, ids, mask, by_teacher=False)
        ids, mask = self.teacher.sample(batch, settings, lockstep=self.sharded)
        return self.crossed(batch, ids, mask, by_teacher=True)

    def crossed(self, batch: Batch, ids: Tensor, mask: Tensor, by_teacher: bool) -> Batch:
        """The batch with these sampled targets on each side: in the student's tokens, and where the teacher reads
        its own, in its tokens too (kdlab.sampling.retokenize)."""
        own = self.teacher.tokenizer if self.teacher is not None else None
        if own is None:
            return batch.with_targets((ids, mask), None)
        if by_teacher:
            return batch.with_targets(retokenize(ids, mask, own, self.tokenizer), (ids, mask))
        return batch.with_targets((ids, mask), retokenize(ids, mask, self.tokenizer, own))

    # -- counts, scores, terms, loss -------------------------------------------------------------------------------
    @staticmethod
    def global_counts(window: list[StepTargets], device: torch.device) -> dict[str, Tensor]:
        """Each unit's count over the whole accumulation window and every process (one all-reduce), plus rows."""
        local = torch.zeros(3, device=device)
        for targets in window:
            mask = targets.batch.student.target_mask
            counts = unit_counts(mask)
            local[0] += counts[TOKENS].to(device)
            local[1] += counts[SEQUENCES].to(device)
            local[2] += mask.shape[0]
        if world_size() > 1:
            dist.all_reduce(local)
        return {TOKENS: local[0], SEQUENCES: local[1], "rows": local[2], NONE: torch.ones((), device=device)}

    def scored(self, targets: StepTargets, want: str = LOGITS) -> tuple[Tensor, Any]:
        """(the student's logits over its token columns, the teacher's scores or None) over the targets; with one
        tokenizer both cut to the token columns every model has (checkpoints pad output layers each their own way:
        Qwen3 151,936 rows for 151,669 tokens; Gemma 3 262,144 or 262,208). `want`: what the teacher answers
        (kdlab.teachers.base)."""
        batch = targets.batch
        logits = score_targets(self.student, *batch.student.prompt, *batch.student.target, self.groups)[
            ..., : self.vocab]
        if not self.objective.needs_teacher:  # loss=sft: the softmax over tokens only
            return logits, None
        scores = self.teacher.scores(batch, targets.prepared, want, self.groups)
        if self.teacher.tokenizer is not None:  # each side keeps its own tokenizer's columns
            return logits, scores
        vocab = min([logits.shape[-1], *_widths(scores)])
        return logits[..., :vocab], _cut(scores, vocab)

    def terms(self, targets: StepTargets, hard_labels: bool) -> tuple[Tensor, dict[str, tuple[float, LossSum]],
                                                                      dict[str, LossSum]]:
        """(the student's logits, the objective's terms, each teacher member's own divergence) on the logits path."""
        batch = targets.batch
        student_logits, scores = self.scored(targets, self.objective.teacher_want(hard_labels))
        ids, mask = batch.student.target
        teacher_mask = batch.teacher.target_mask if batch.teacher is not None else None
        terms = self.objective.terms(student_logits, scores, ids, mask, teacher_mask, hard_labels)
        members = self.objective.member_terms(student_logits.detach(), scores, ids, mask) if isinstance(
            scores, Members) else {}
        return student_logits, terms, members

    def loss(self, targets: StepTargets, counts: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's share of the global loss (every term's sum over the global count of its unit), and its
        shares of each logged value, which add up over micro-batches and processes to the global values. The CE
        term is left out on the student's own samples (GKD's on-policy objective has none) and on speculative
        targets, which are the student's proposals where the teacher kept them."""
        if self.objective.needs_student_samples and targets.source != STUDENT:
            raise ValueError(f"loss={self.objective.name} weighs the student's own samples, but this step's targets "
                             f"are {targets.source}: fixed data has no student samples to weigh "
                             f"(policy.student_fraction=1, not policy=speculative)")
        hard_labels = targets.source not in SAMPLED_SOURCES
        if self.fused and targets.advantages is None:  # REINFORCE reads the student's logits: the logits path
            from kdlab.step.fused import fused_terms

            anchor, terms = fused_terms(self, targets, hard_labels)  # no logits: a gradient anchor
            members = {}
        else:
            anchor, terms, members = self.terms(targets, hard_labels)
        shares = {name: normalised(term, counts) for name, (_, term) in terms.items()}
        shares.update({name: value.to(counts[TOKENS].device) / counts[TOKENS].clamp(min=1)
                       for name, value in targets.stats.items()})
        shares.update({f"teacher/{name}": normalised(term, counts).detach() for name, term in members.items()})
        loss = anchor.sum() * 0.0 + sum(weight * shares[name] for name, (weight, _) in terms.items())
        if targets.advantages is not None:  # GKD Eq. 5: alpha * distillation + (1 - alpha) * REINFORCE
            alpha, ids_mask = self.reward.alpha, targets.batch.student.target
            shares["distill"] = loss
            shares["pg"] = normalised(policy_gradient_sum(anchor, *ids_mask, targets.advantages), counts)
            loss = alpha * loss + (1 - alpha) * shares["pg"]
            shares["reward"] = targets.rewards.sum() / counts["rows"]
            shares["advantage"] = targets.advantages.abs().sum() / counts["rows"]
        shares["loss"] = loss
        return loss, {name: value.detach().float() for name, value in shares.items()}

    def validation_loss(self, batch: Batch) -> Tensor:
        """The objective on the batch's own targets, each term normalised within the batch (the logits path)."""
        student_logits, terms, _ = self.terms(StepTargets(batch, GROUND_TRUTH, self._prepared(batch)), True)
        return student_logits.sum() * 0.0 + sum(weight * term.mean() for weight, term in terms.values())

    def _prepared(self, batch: Batch) -> Any:
        return self.teacher.prepare(batch) if self.objective.needs_teacher else None

    def score_student(self, prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """The student's logits over its token columns for these targets."""
        return score_targets(self.student, prompt_ids, prompt_mask, ids, mask, self.groups)[..., : self.vocab]

    def score_teacher(self, prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor) -> Tensor | None:
        """The teacher's dense scores of these targets in the student's tokens, where it scores in the process with
        the student's tokenizer (a model, or several mixed); else None (outside, its own tokens, routed members)."""
        teacher = self.teacher
        if teacher is None or not teacher.in_process or teacher.tokenizer is not None or hasattr(teacher, "routes"):
            return None
        scores = teacher.scores(Batch(Side(prompt_ids, prompt_mask, ids, mask), [""] * ids.shape[0]), None, LOGITS,
                                self.groups)
        scores = scores.mixture if isinstance(scores, Members) else scores
        return scores if isinstance(scores, Tensor) else None

    def mismatch_sums(self, prompt: tuple[Tensor, Tensor], ids: Tensor, mask: Tensor) -> Tensor | None:
        """The teacher's view of the student's own outputs (kdlab.evaluation.mismatch), per row; None without a
        teacher that scores them densely here."""
        return own_output_sums(self.score_student, self.score_teacher, prompt, (ids, mask), self.vocab)

def _widths(scores: Any) -> list[int]:
    """The vocabulary columns of each dense part of a teacher's scores (a top-k carries ids instead)."""
    if isinstance(scores, Tensor):
        return [scores.shape[-1]]
    if isinstance(scores, Members):
        return [w for part, _ in scores.parts.values() for w in _widths(part)] + _widths(scores.mixture)
    return []


def _cut(scores: Any, vocab: int) -> Any:
    if isinstance(scores, Members):
        parts = {name: (_cut(part, vocab), rows) for name, (part, rows) in scores.parts.items()}
        return replace(scores, parts=parts, mixture=_cut(scores.mixture, vocab))
    return with_vocab(scores, vocab) if scores is not None else None

"""DistillationModule: a trainable student and a frozen teacher in one LightningModule.

One training step (GKD Algorithm 1): the data policy picks where the targets come from (ground truth, teacher
samples, or the student's own samples), both models score the same target tokens, and one objective compares them
over response positions only. When the teacher tokenizes differently, both score the same target *text*, each in its
own tokens, and a cross-tokenizer loss (loss=ot|uld) compares the two. The teacher never trains: no grad, eval mode
whatever Lightning does to the module, left out of the optimizer, of checkpoints and of the student export.

A train batch is this process's whole accumulation window. The step produces the targets of every micro-batch,
counts their units (tokens, sequences) over the window and every process, then backpropagates each micro-batch's
sum divided by those global counts, and steps once: one normalisation, whatever the split (losses/normalisation.py).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab.data.batch import Batch
from kdlab.data.tasks import Task
from kdlab.evaluation.mismatch import own_output_sums
from kdlab.losses.normalisation import NONE, SEQUENCES, TOKENS, LossSum, normalised, unit_counts
from kdlab.losses.objective import Objective
from kdlab.losses.sparse import TopK
from kdlab.models.lora import ADAPTER_KEY, export_lora, has_lora
from kdlab.models.scoring import score_targets
from kdlab.models.sharding import FSDP2Strategy, any_rank, full_state_dict, is_sharded, shard_model, world_size
from kdlab.run.checkpoints import LastCheckpoint
from kdlab.run.console import quiet_weight_bars
from kdlab.sampling.hf import SamplingSettings, generate_targets
from kdlab.sampling.retokenize import response_texts, retokenize
from kdlab.step.fused import fused_terms, log_plan
from kdlab.step.policy import STUDENT, DataPolicy
from kdlab.step.resilience import NonFiniteGuard, step_seed
from kdlab.step.rewards import RewardTerm, leave_one_out_advantages, policy_gradient_sum
from kdlab.step.rollouts import rollout_rows
from kdlab.teachers.client import TeacherLost, TeacherServerError
from kdlab.teachers.ensemble import ROUTE, TeacherEnsemble
from kdlab.teachers.outside import CachedTeacher, RemoteTeacher

TEACHER_PREFIXES = ("teacher.", "teachers.")  # the teacher, and the model members of several teachers


class TeacherUnavailable(TeacherServerError):
    """The teacher server stopped answering mid-run; the message says where the checkpoint to resume from is."""

STUDENT_PREFIX = "student."

# Lightning warns when submodules are in eval mode as training starts; the frozen teacher is, by design.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


@dataclass
class StepTargets:
    """What one micro-batch trains on: its rows with the step's targets on each side, and with a reward each
    sample's reward and advantage."""

    batch: Batch
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    outside_scores: dict[str, TopK] = field(default_factory=dict)  # cached or remote teachers' answers, by name


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        student: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: Objective,
        policy: DataPolicy,
        task: Task,
        optimizer: Callable[..., torch.optim.Optimizer],
        max_nonfinite_steps: int,
        score_groups: int,
        teacher: PreTrainedModel | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        eval_sampling: SamplingSettings = SamplingSettings(do_sample=False),
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        reward: RewardTerm | None = None,
        seed: int = 0,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        outside_teacher: CachedTeacher | RemoteTeacher | None = None,
        ensemble: TeacherEnsemble | None = None,
        rollouts: tuple[int, int] = (0, 0),
    ):
        # optimizer, max_nonfinite_steps and score_groups: defaults in conf/train.yaml, checks in kdlab.run.validate
        super().__init__()
        # A step counts its whole window's units before any backward (kdlab.losses.normalisation), which Lightning's
        # accumulation cannot: the module accumulates, clips (`trainer.gradient_clip_val`) and steps itself.
        self.automatic_optimization = False
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        if objective.needs_teacher and teacher is None and outside_teacher is None and ensemble is None:
            raise ValueError(f"loss={objective.name} compares the student with a teacher, but no teacher was given")
        self.student, self.teacher = student, teacher
        # teacher=cached|remote: the teacher's top-k comes from outside the process (kdlab.teachers.outside)
        self.outside_teacher = outside_teacher
        # several teachers (kdlab.teachers.ensemble); their models are submodules, frozen as the teacher is
        self.ensemble = ensemble
        self.teachers = torch.nn.ModuleDict(ensemble.models) if ensemble is not None and ensemble.models else None
        for model in self._teacher_models():
            model.requires_grad_(False)
            model.eval()
        self.tokenizer = tokenizer
        # None: the teacher reads the student's tokens. Otherwise batches carry the teacher's own tokens as well
        # (`Batch.teacher`) and samples cross between the two through text (kdlab.sampling.retokenize).
        self.teacher_tokenizer = teacher_tokenizer
        self.objective = objective
        self.reward = reward  # GKD Eq. 5: a reward optimised on the student's own samples (None: pure distillation)
        self.policy, self.task = policy, task
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.rollouts = rollouts  # (every n steps, examples): kdlab.step.rollouts; 0 steps: never
        self.eval_sampling = eval_sampling
        self.eval_role = "student"  # which model validation generates with: "student" or "teacher"
        self.strict_loading = False  # checkpoints leave the teacher out; it is rebuilt from its config
        self._onpolicy_steps, self._policy_steps = 0, 0
        self._step_start, self._step_tokens = 0.0, 0
        self.train_tokens = 0  # scored response tokens seen in training (this process)
        self.seed, self.nonfinite = seed, NonFiniteGuard(max_nonfinite_steps)
        self._loss_skipped = False
        # Scoring reads a batch in up to this many groups of rows of similar length (kdlab.models.scoring.score_targets)
        self.score_groups = score_groups
        self._fused_reason: str | None = ""  # why training steps keep the logits path (None: fused); "": not decided

    # -- modes ---------------------------------------------------------------------------------------------------
    def _teacher_models(self) -> list[torch.nn.Module]:
        """Every teacher model in this process: the teacher, or the model members of several teachers."""
        return ([self.teacher] if self.teacher is not None else []) + list((self.teachers or {}).values())

    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        for teacher in self._teacher_models():
            teacher.eval()  # no dropout in a teacher, ever
        return self

    # -- training ------------------------------------------------------------------------------------------------
    @property
    def cross_tokenizer(self) -> bool:
        return self.teacher_tokenizer is not None

    def _sample(self, role: str, batch: Batch, settings: SamplingSettings) -> tuple[Tensor, Tensor]:
        """Generate with `role`'s model from its own prompt tokens; (ids, mask) in its own tokens."""
        own = role == "teacher" and self.cross_tokenizer
        model = self.teacher if role == "teacher" else self.student
        tokenizer = self.teacher_tokenizer if own else self.tokenizer
        return generate_targets(
            model,
            *batch.side(role).prompt,
            settings,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=self._sharded,
            vocab=len(tokenizer),
        )

    def _targets(self, batch: Batch, source: str) -> Batch:
        """`batch` with `source`'s targets on each side: its own (the ground truth), or samples of the student or the
        teacher. Samples from one tokenizer reach the other side through text."""
        if source == "ground_truth":
            return batch
        role = "student" if source == STUDENT else "teacher"
        if role == "teacher" and isinstance(self.outside_teacher, CachedTeacher):
            # SeqKD from a cache: the samples kdlab-cache-teacher drew from the teacher for these examples
            ids, mask = self.outside_teacher.samples(batch, self.tokenizer.pad_token_id)
        else:
            ids, mask = self._sample(role, batch, self.policy.sampling)
        if not self.cross_tokenizer:
            return batch.with_targets((ids, mask), None)
        if role == "student":
            return batch.with_targets((ids, mask), retokenize(ids, mask, self.tokenizer, self.teacher_tokenizer))
        return batch.with_targets(retokenize(ids, mask, self.teacher_tokenizer, self.tokenizer), (ids, mask))

    @property
    def _sharded(self) -> bool:
        # With sharded parameters every forward pass is a collective, so a rank that finished sampling must keep
        # stepping until all have (synced_gpus) or the others hang. DDP replicas sample independently: no sync.
        return self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def _loss(self, batch: Batch, hard_labels: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on `batch`'s targets, each term normalised within the batch (validation's loss)."""
        student_logits, terms, _ = self._terms(batch, {}, hard_labels)
        total = student_logits.sum() * 0.0 + sum(weight * term.mean() for weight, term in terms.values())
        return total, {name: term.mean().detach() for name, (_, term) in terms.items()}

    def _terms(self, batch: Batch, outside_scores: dict[str, TopK],
               hard_labels: bool) -> tuple[Tensor, dict[str, tuple[float, LossSum]], dict[str, LossSum]]:
        """(student logits, the objective's terms, each teacher member's own divergence) over the batch's targets:
        the teachers in this process score here, the outside ones answered before (`outside_scores`)."""
        student_logits, local = self._scores(batch)
        return student_logits, *self._terms_of(student_logits, {**local, **outside_scores}, batch, hard_labels)

    def _terms_of(self, student_logits: Tensor, scores: dict[str, Tensor | TopK], batch: Batch,
                  hard_labels: bool) -> tuple[dict[str, tuple[float, LossSum]], dict[str, LossSum]]:
        """`_terms` from scores already computed: the student's logits and every teacher's, by name."""
        if self.ensemble is not None and self.ensemble.combine == ROUTE:
            return self._routed_terms(student_logits, scores, batch, hard_labels)
        teacher = self._teacher_view(batch, scores)
        terms = self.objective.terms(student_logits, teacher, *batch.student.target, _teacher_mask(batch), hard_labels)
        members = self._member_terms(student_logits.detach(), scores, batch) if self.ensemble is not None else {}
        return terms, members

    def _scores(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's logits over the batch's targets and each teacher model's in this process, by name
        ("teacher", or the members of several teachers), each model reading its own tokens, trimmed to the columns
        that are tokens: the tokenizer's, and with one tokenizer the columns every model has."""
        # Sharded ranks must run the same forward passes, whatever their rows' lengths: one group there.
        groups = 1 if self._sharded else self.score_groups
        student_logits = score_targets(self.student, *batch.student.prompt, *batch.student.target, groups)
        if not self.objective.needs_teacher:  # loss=sft: the softmax over tokens only, not a padded head's other rows
            return student_logits[..., : len(self.tokenizer)], {}
        if self.cross_tokenizer:
            with torch.no_grad():
                teacher = batch.side("teacher")
                teacher_logits = score_targets(self.teacher, *teacher.prompt, *teacher.target, groups)
            # Models may pad their output layer beyond their tokenizer: columns past it are no tokens at all.
            return student_logits[..., : len(self.tokenizer)], {"teacher": teacher_logits[..., : len(
                self.teacher_tokenizer)]}
        models = {"teacher": self.teacher} if self.teacher is not None else dict(self.teachers or {})
        with torch.no_grad():
            local = {name: score_targets(model, *batch.student.prompt, *batch.student.target, groups)
                     for name, model in models.items()}
        # Same tokenizer, but checkpoints pad their output layers beyond it, each size its own way (Qwen3: 151,936
        # rows for 151,669 tokens; Gemma 3: 262,144 or 262,208): the loss sees the token columns all models have.
        vocab = min(len(self.tokenizer), student_logits.shape[-1], *(t.shape[-1] for t in local.values()))
        return student_logits[..., :vocab], {name: t[..., :vocab] for name, t in local.items()}

    def _teacher_view(self, batch: Batch, scores: dict[str, Tensor | TopK]) -> Tensor | TopK | None:
        """What the loss compares the student with: the one teacher's logits or top-k, or several teachers
        combined (kdlab.teachers.ensemble); None without a teacher."""
        if self.ensemble is not None:
            return self.ensemble.combined(scores, batch)
        return next(iter(scores.values()), None)

    def _step_targets(self, batch: Batch, source: str) -> StepTargets:
        """One micro-batch's targets from `source`, and with a reward (GKD Eq. 5, on the student's own samples)
        each prompt sampled k times with its rewards and leave-one-out advantages. No gradient: sampling only."""
        rewarded = source == STUDENT and self.reward is not None and self.reward.active
        if rewarded:
            batch = batch.repeat_rows(self.reward.samples_per_prompt)
        targets = StepTargets(self._targets(batch, source))
        if self.objective.needs_teacher and self.outside_teacher is not None:
            targets.outside_scores = {"teacher": self.outside_teacher.top_k(targets.batch)}
        elif self.objective.needs_teacher and self.ensemble is not None:
            targets.outside_scores = self.ensemble.outside_scores(targets.batch)
        if rewarded:
            texts, _ = response_texts(*targets.batch.student.target, self.tokenizer)
            targets.rewards = self.reward.score([t.strip() for t in texts], batch.reference).to(self.device)
            targets.advantages = leave_one_out_advantages(targets.rewards, self.reward.samples_per_prompt)
        return targets

    def _global_counts(self, window: list[StepTargets]) -> dict[str, Tensor]:
        """Each unit's count over the whole accumulation window and every process (one all-reduce), plus rows."""
        local = torch.zeros(3, device=self.device)
        for targets in window:
            mask = targets.batch.student.target_mask
            counts = unit_counts(mask)
            local[0] += counts[TOKENS].to(local.device)
            local[1] += counts[SEQUENCES].to(local.device)
            local[2] += mask.shape[0]
        if world_size() > 1:
            dist.all_reduce(local)
        return {TOKENS: local[0], SEQUENCES: local[1], "rows": local[2], NONE: torch.ones((), device=self.device)}

    def _micro_loss(self, targets: StepTargets, hard_labels: bool,
                    counts: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's share of the global loss (every term's sum over the global count of its unit), and
        its shares of each logged value, which add up over micro-batches and processes to the global values."""
        t, batch = targets, targets.batch
        if self._fused and t.advantages is None:  # REINFORCE reads the student's logits: the logits path
            student_logits, terms = fused_terms(self, batch, hard_labels)  # no logits: only a gradient anchor
            members = {}
        else:
            student_logits, terms, members = self._terms(batch, t.outside_scores, hard_labels)
        shares = {name: normalised(term, counts) for name, (_, term) in terms.items()}
        shares.update({f"teacher/{name}": normalised(term, counts).detach() for name, term in members.items()})
        loss = student_logits.sum() * 0.0 + sum(weight * shares[name] for name, (weight, _) in terms.items())
        if t.advantages is not None:  # GKD Eq. 5: alpha * distillation + (1 - alpha) * REINFORCE
            alpha = self.reward.alpha
            shares["distill"] = loss
            pg = policy_gradient_sum(student_logits, *batch.student.target, t.advantages)
            shares["pg"] = normalised(pg, counts)
            loss = alpha * loss + (1 - alpha) * shares["pg"]
            shares["reward"] = t.rewards.sum() / counts["rows"]
            shares["advantage"] = t.advantages.abs().sum() / counts["rows"]
        shares["loss"] = loss
        return loss, {name: value.detach().float() for name, value in shares.items()}

    @property
    def _fused(self) -> bool:
        """Whether training steps compute the terms from hidden states (kdlab.step.fused); decided and logged once."""
        if self._fused_reason == "":
            self._fused_reason = log_plan(self)
        return self._fused_reason is None

    def on_fit_start(self) -> None:
        self._fused_reason = log_plan(self)  # the strategy is known now (models sharded by FSDP2 are fused)

    def _member_terms(self, student_logits: Tensor, scores: dict[str, Tensor | TopK],
                      batch: Batch) -> dict[str, LossSum]:
        """Each member's own divergence from the student over the rows it teaches (all of them in a mixture), as the
        objective's LossSum: logged as train/teacher/<name>, and with route the loss itself."""
        ids, mask = batch.student.target
        out = {}
        for name, rows in self.ensemble.member_rows(batch).items():
            terms = self.objective.terms(student_logits, scores[name], ids, mask & rows[:, None], hard_labels=False)
            out[name] = terms[self.objective.name][1]
        return out

    def _routed_terms(self, student_logits: Tensor, scores: dict[str, Tensor | TopK], batch: Batch,
                      hard_labels: bool) -> tuple[dict[str, tuple[float, LossSum]], dict[str, LossSum]]:
        """teachers.combine=route: each row's divergence from its own member; their sum is the divergence term."""
        members = self._member_terms(student_logits, scores, batch)
        parts = list(members.values())
        total = LossSum(sum(p.total for p in parts), sum(p.count for p in parts), parts[0].unit)
        terms = {self.objective.name: (1.0, total)}
        if self.objective.ce_weight > 0 and hard_labels:
            terms["ce"] = (self.objective.ce_weight, self.objective.ce_term(student_logits, *batch.student.target))
        return terms, members

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()
        # Sampling and dropout draw from a state fixed by (seed, step, rank): a resumed run repeats them exactly.
        torch.manual_seed(step_seed(self.seed, self.trainer.global_step, self.global_rank))

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """One optimizer step on this process's accumulation window: targets for every micro-batch first, then
        their units counted globally, then each micro-batch's normalised loss backpropagated, then one update."""
        source = self.policy.draw(self.trainer.global_step)  # one draw per optimizer step, the same on every rank
        lost = None
        with torch.no_grad():
            try:
                window = [self._step_targets(part, source) for part in batch.split(self.task.config.batch_size)]
            except TeacherLost as err:  # before any backward: no process is left waiting in a collective
                lost = err
        if any_rank(lost is not None, self.device):
            self._stop_without_teacher(lost)
        every, examples = self.rollouts
        step = self.trainer.global_step
        rollouts = rollout_rows(self, window[0], source, step, examples) if every and step % every == 0 else None
        counts = self._global_counts(window)
        world = world_size()  # DDP and FSDP average gradients over processes; the shares are of the global sum
        shares: dict[str, Tensor] = {}
        for targets in window:
            loss, values = self._micro_loss(targets, source != STUDENT, counts)
            self.manual_backward(loss * world)
            for name, value in values.items():
                shares[name] = shares.get(name, 0.0) + value
        self._policy_steps += 1
        self._onpolicy_steps += int(source == STUDENT)
        self._step_tokens = int(sum(int(t.batch.student.target_mask.sum()) for t in window))
        self.train_tokens += self._step_tokens
        totals = _all_reduce_sum(shares)
        self._optimizer_step(totals)
        if bool(torch.isfinite(totals["loss"])):
            self._log_step(totals, source, int(counts["rows"]))
        return {"loss": totals["loss"], **({"rollouts": rollouts} if rollouts else {})}

    def _stop_without_teacher(self, error: Exception | None) -> None:
        """The teacher server is gone (on this process or another): save `last.ckpt` as it stands before this step,
        which a resumed run repeats exactly (its data and seed are functions of the step), and stop."""
        step = self.trainer.global_step
        last = next((c for c in self.trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        if last is not None:
            last.save(self.trainer)  # every process: a collective under DDP and FSDP
        where = f"saved {last.path} at step {step}" if last is not None else f"at step {step}, no checkpoint callback"
        raise TeacherUnavailable(f"{error or 'the teacher server failed on another process'}; {where}. Resume once "
                                 "the server answers: python train.py <same overrides> hydra.run.dir=<this run> "
                                 "ckpt_path=last")

    def _optimizer_step(self, totals: dict[str, Tensor]) -> None:
        """Step the optimizer and the scheduler once. A non-finite loss (on any process: `totals` are global) is
        recorded and its gradients dropped; gradients are checked and clipped in `on_before_optimizer_step`, which
        `optimizer.step()` calls first. A skipped step applies nothing, but the step count moves on."""
        self._loss_skipped = not bool(torch.isfinite(totals["loss"]))
        if self._loss_skipped:
            parts = ", ".join(f"{k}={float(v):.4g}" for k, v in totals.items() if k != "loss")
            self.nonfinite.record(self.trainer.global_step, False, f"loss ({float(totals['loss'])}; {parts})")
            for p in self.student.parameters():
                p.grad = None  # the optimizer skips parameters without gradients: nothing is applied
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop every process's gradients when any holds a non-finite one; else clip them (as Lightning's automatic
        optimization does, after the callbacks' hooks have seen them unclipped)."""
        if self._loss_skipped:
            return
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
        finite = not local or bool(torch.stack(torch._foreach_norm(local)).isfinite().all())
        finite = not any_rank(not finite, self.device)
        self.nonfinite.record(self.trainer.global_step, finite, "gradient")
        if not finite:
            for p in self.student.parameters():
                p.grad = None  # the optimizer skips parameters without gradients: nothing is applied
        elif self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val,
                                gradient_clip_algorithm=self.gradient_clip_algorithm)

    def _log_step(self, totals: dict[str, Tensor], source: str, rows: int) -> None:
        """train/loss is the loss normalised over the global batch; components are the global values too."""
        self.log("train/loss", totals["loss"], prog_bar=True, batch_size=rows)
        for name, value in totals.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=rows)
        self.log("train/onpolicy", float(source == STUDENT), batch_size=rows)
        self.log("train/onpolicy_fraction", self.onpolicy_fraction, batch_size=rows)
        self.log("train/target_tokens", float(self._step_tokens), batch_size=rows)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Scored response tokens per second of the whole step: sampling, both forwards, backward, optimizer.
        elapsed = time.perf_counter() - self._step_start
        self.log("train/tokens_per_sec", self._step_tokens / max(elapsed, 1e-9), prog_bar=True)

    @property
    def onpolicy_fraction(self) -> float:
        """Share of training steps so far whose targets were the student's own samples."""
        return self._onpolicy_steps / max(1, self._policy_steps)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, list]:
        """Generate with `eval_role`'s model; returns the batch's generations and references, which
        kdlab.evaluation.generations.GenerationScorer collects, scores and logs at the end of the epoch."""
        ids, mask = self._sample(self.eval_role, batch, self.eval_sampling)
        own = self.eval_role == "teacher" and self.cross_tokenizer
        texts = (self.teacher_tokenizer if own else self.tokenizer).batch_decode(ids, skip_special_tokens=True)
        in_process = self.teacher is not None or (self.ensemble is not None and not self.ensemble.outside)
        # the target template's leading space is no content
        outputs = {"predictions": [text.strip() for text in texts], "references": list(batch.reference)}
        if self.eval_role == "student" and (in_process or not self.objective.needs_teacher):
            loss, _ = self._loss(batch)
            self.log("val/loss", loss, batch_size=ids.shape[0], sync_dist=True)
        if self.eval_role == "student" and self.teacher is not None and not self.cross_tokenizer:
            # the teacher's view of the student's own outputs (kdlab.evaluation.mismatch): GKD's train-inference mismatch
            outputs["mismatch"] = own_output_sums(self.student, self.teacher, batch.student.prompt, (ids, mask),
                                                  len(self.tokenizer), 1 if self._sharded else self.score_groups
                                                  ).tolist()
        return outputs

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, Batch) else super().transfer_batch_to_device(batch, device,
                                                                                                   dataloader_idx)

    # -- sharding, optimisation and checkpoints ------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under strategy=fsdp: FSDP2 `fully_shard` per transformer block, then per model, student and teacher."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDP2Strategy) or is_sharded(self.student):
            return  # Lightning calls this hook before fit and before each validate: shard once
        mesh = self.device_mesh["data_parallel"]
        shard_model(self.student, mesh, strategy.sharding, frozen=False)
        for teacher in self._teacher_models():
            shard_model(teacher, mesh, strategy.sharding, frozen=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.student.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints leave out the teacher, and a LoRA student's frozen base: both are rebuilt from their configs
        on resume (`strict_loading` is off), so a checkpoint holds what training changed (for LoRA, the adapters),
        the optimizer, the scheduler and the loop's counters: a resume is exact."""
        lora = has_lora(self.student)
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items()
            if not k.startswith(TEACHER_PREFIXES) and (not lora or not k.startswith(STUDENT_PREFIX) or ADAPTER_KEY in k)
        }
        checkpoint["kdlab_policy_counts"] = (self._onpolicy_steps, self._policy_steps)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._onpolicy_steps, self._policy_steps = checkpoint.get("kdlab_policy_counts", (0, 0))

    def export_student(self, directory: str) -> None:
        """The student alone, in Hugging Face format with its tokenizer (loadable with `from_pretrained`). A LoRA
        student writes the merged model there and its adapter in `directory/adapter` (kdlab.models.lora.export_lora).

        Every process calls it: a sharded student is first gathered whole (a collective), then rank 0 writes it."""
        state = full_state_dict(self.student) if is_sharded(self.student) else None
        if self.global_rank != 0:
            return
        if has_lora(self.student):
            export_lora(self.student, state if state is not None else self.student.state_dict(), directory)
        else:
            size = sum(p.numel() * p.element_size() for p in self.student.parameters())
            with quiet_weight_bars(size):  # a one-shard bar for a small student says nothing
                if state is None:
                    self.student.save_pretrained(directory)
                else:
                    self.student.save_pretrained(directory, state_dict=state)
        self.tokenizer.save_pretrained(directory)


def _all_reduce_sum(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each value summed over processes, in one all-reduce (every process holds the same names)."""
    names = sorted(values)
    stacked = torch.stack([values[name] for name in names])
    if world_size() > 1:
        dist.all_reduce(stacked)
    return dict(zip(names, stacked))


def _teacher_mask(batch: Batch) -> Tensor | None:
    """The teacher's own target mask when it reads its own tokens (cross-tokenizer losses), else None."""
    return batch.teacher.target_mask if batch.teacher is not None else None

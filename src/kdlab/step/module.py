"""DistillationModule: the Lightning hooks around one distillation step (kdlab.step.step.DistillationStep).

A train batch is this process's whole accumulation window. `training_step` reads top to bottom: the policy draws
where the step's targets come from (GKD Algorithm 1), every micro-batch's targets are made (sampled, and read ahead
by the teacher) before any backward, their units are counted over the window and every process, each micro-batch's
share of the normalised loss is backpropagated, and the optimizer steps once; the sampler then reads the new
weights. One normalisation, whatever the split (kdlab.losses.normalisation). The teacher never trains: its models
are frozen, kept in eval mode whatever Lightning does to the module, and left out of the optimizer, of checkpoints
and of the student export.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor

from kdlab.data.batch import Batch
from kdlab.models.export import export_student, trained_state
from kdlab.models.scoring import unwrap
from kdlab.models.sharding import FSDP2Strategy, any_rank, is_sharded, shard_model, world_size
from kdlab.run.checkpoints import LastCheckpoint
from kdlab.sampling.base import SamplingSettings
from kdlab.step.policy import SAMPLED_SOURCES, DataPolicy
from kdlab.step.resilience import NonFiniteGuard, step_seed
from kdlab.step.rollouts import rollout_rows
from kdlab.step.step import DistillationStep, StepTargets
from kdlab.teachers.client import TeacherLost

# Lightning warns when submodules are in eval mode as training starts; the frozen teacher is, by design.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class TeacherUnavailable(TeacherLost):
    """The teacher server stopped answering mid-run; the message says where the checkpoint to resume from is."""


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer and scheduler factories (Hydra partials) and gradient clipping (`trainer.gradient_clip_*`),
    which the module applies itself: it accumulates and steps by hand to normalise once per window."""

    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"


@dataclass(frozen=True)
class RunSettings:
    """What the module needs of the run: the micro-batch size (`task.batch_size`), the seed of every step's draws,
    how many skipped non-finite steps in a row stop it, how often rollouts are written (every n steps, examples;
    0: never), evaluation's generation settings (`task.generation`) and the command that resumes the run."""

    micro_batch_size: int
    seed: int
    max_nonfinite_steps: int
    eval_sampling: SamplingSettings
    rollouts: tuple[int, int] = (0, 0)
    resume_command: str = "python train.py <overrides> hydra.run.dir=<run> ckpt_path=last"


class DistillationModule(L.LightningModule):
    def __init__(self, step: DistillationStep, policy: DataPolicy, optim: OptimSettings, settings: RunSettings):
        super().__init__()
        # A step counts its whole window's units before any backward (kdlab.losses.normalisation), which Lightning's
        # accumulation cannot: the module accumulates, clips and steps itself.
        self.automatic_optimization = False
        self.step, self.policy, self.optim, self.settings = step, policy, optim, settings
        self.student = step.student
        self.teachers = torch.nn.ModuleList(step.teacher.models if step.teacher is not None else [])
        self.eval_role = "student"  # which model validation generates with: "student" or "teacher"
        self.strict_loading = False  # checkpoints leave the teacher out; it is rebuilt from its config
        self.nonfinite = NonFiniteGuard(settings.max_nonfinite_steps)
        self.onpolicy_steps = self.policy_steps = self.train_tokens = 0  # this process's counts
        self.teacher_tokens = ForwardTokens(list(self.teachers))
        self.teacher_forward_tokens = 0  # over every process and step: the teacher's compute in training
        self._step_start, self._step_tokens, self._loss_skipped = 0.0, 0, False

    @property
    def teacher(self) -> Any:
        return self.step.teacher

    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        self.teachers.eval()  # no dropout in a teacher, ever
        return self

    def setup(self, stage: str) -> None:
        self.step.sharded = shards_models(self.trainer.strategy)

    # -- training ------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()
        self.teacher_tokens.take()  # validation's and evaluation's passes are not training's
        # Sampling and dropout draw from a state fixed by (seed, step, rank): a resumed run repeats them exactly.
        torch.manual_seed(step_seed(self.settings.seed, self.trainer.global_step, self.global_rank))

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """One optimizer step on this process's accumulation window (see the module doc)."""
        step = self.trainer.global_step
        source = self.policy.draw(step)  # one draw per optimizer step, the same on every rank
        window = self._window(batch, source, step)
        teacher_tokens = self.teacher_tokens.take()  # sampling's (policy=speculative); rollouts' are no training's
        every, examples = self.settings.rollouts
        rollouts = rollout_rows(self.step, window[0], step, examples) if every and step % every == 0 else None
        self.teacher_tokens.take()
        counts = self.step.global_counts(window, self.device)
        shares: dict[str, Tensor] = {}
        for targets in window:  # scores -> terms -> this micro-batch's share of the normalised loss -> backward
            loss, values = self.step.loss(targets, counts)
            self.manual_backward(loss * world_size())  # DDP and FSDP average gradients over processes
            for name, value in values.items():
                shares[name] = shares.get(name, 0.0) + value
        teacher_tokens += self.teacher_tokens.take()  # scoring's
        shares["teacher_forward_tokens"] = torch.tensor(float(teacher_tokens), device=self.device)
        totals = _all_reduce_sum(shares)
        self.teacher_forward_tokens += int(totals["teacher_forward_tokens"])
        self._optimizer_step(totals)
        self.step.sampler.sync(self.student)  # an engine outside the module reads the updated weights
        self.policy_steps += 1
        self.onpolicy_steps += int(source in SAMPLED_SOURCES)
        self._step_tokens = int(sum(int(t.batch.student.target_mask.sum()) for t in window))
        self.train_tokens += self._step_tokens
        if bool(torch.isfinite(totals["loss"])):
            self._log_step(totals, source, int(counts["rows"]))
        return {"loss": totals["loss"], **({"rollouts": rollouts} if rollouts else {})}

    def _window(self, batch: Batch, source: str, step: int) -> list[StepTargets]:
        """Every micro-batch's targets, before any backward: a lost teacher (on any process) stops the run here with
        a checkpoint of the state before this step, and no process is left waiting in a collective."""
        lost, window = None, []
        seed = step_seed(self.settings.seed, step, self.global_rank)
        try:
            for i, part in enumerate(batch.split(self.settings.micro_batch_size)):
                window.append(self.step.targets(part, source, self.policy.sampling, seed + i))
        except TeacherLost as err:
            lost = err
        if any_rank(lost is not None, self.device):
            last = next((c for c in self.trainer.callbacks if isinstance(c, LastCheckpoint)), None)
            if last is not None:
                last.save(self.trainer)  # every process: a collective under DDP and FSDP; a resume repeats this step
            where = f"saved {last.path} at step {step}" if last is not None else f"at step {step}, no checkpoint"
            raise TeacherUnavailable(f"{lost or 'the teacher server failed on another process'}; {where}. Resume "
                                     f"once the server answers: {self.settings.resume_command}")
        return window

    def _optimizer_step(self, totals: dict[str, Tensor]) -> None:
        """Step the optimizer and the scheduler once. A non-finite loss (on any process: `totals` are global) is
        recorded and its gradients dropped; gradients are checked and clipped in `on_before_optimizer_step`, which
        `optimizer.step()` calls first. A skipped step applies nothing, but the step count moves on."""
        self._loss_skipped = not bool(torch.isfinite(totals["loss"]))
        if self._loss_skipped:
            parts = ", ".join(f"{k}={float(v):.4g}" for k, v in totals.items() if k != "loss")
            self.nonfinite.record(self.trainer.global_step, False, f"loss ({float(totals['loss'])}; {parts})")
            self.student.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
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
            self.student.zero_grad(set_to_none=True)
        elif self.optim.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.gradient_clip_val,
                                gradient_clip_algorithm=self.optim.gradient_clip_algorithm)

    def _log_step(self, totals: dict[str, Tensor], source: str, rows: int) -> None:
        """train/loss is the loss normalised over the global batch; components are the global values too."""
        for name, value in totals.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=rows)
        self.log("train/onpolicy", float(source in SAMPLED_SOURCES), batch_size=rows)
        self.log("train/onpolicy_fraction", self.onpolicy_fraction, batch_size=rows)
        self.log("train/target_tokens", float(self._step_tokens), batch_size=rows)
        self.log("train/teacher_forward_tokens_total", float(self.teacher_forward_tokens), batch_size=rows)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Scored response tokens per second of the whole step: sampling, both forwards, backward, optimizer.
        elapsed = time.perf_counter() - self._step_start
        self.log("train/tokens_per_sec", self._step_tokens / max(elapsed, 1e-9), prog_bar=True)

    @property
    def onpolicy_fraction(self) -> float:
        """Share of training steps so far whose targets were the student's own samples (or, policy=speculative,
        its proposals interleaved with the teacher's replacements)."""
        return self.onpolicy_steps / max(1, self.policy_steps)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, list]:
        """Generate with `eval_role`'s model; returns the batch's generations and references, which
        kdlab.evaluation.generations.GenerationScorer collects, scores and logs at the end of the epoch. For the
        student, with a teacher that scores here, also the validation loss and the teacher's view of the student's
        own outputs (kdlab.evaluation.mismatch)."""
        step, sampling, prompt = self.step, self.settings.eval_sampling, batch.student.prompt
        if self.eval_role == "teacher":
            ids, mask = step.teacher.sample(batch, sampling, lockstep=step.sharded)
            tokenizer = step.teacher.tokenizer or step.tokenizer
        else:
            ids, mask = step.sampler.sample(*prompt, sampling, lockstep=step.sharded)
            tokenizer = step.tokenizer
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        # the target template's leading space is no content
        outputs = {"predictions": [text.strip() for text in texts], "references": list(batch.reference),
                   "prompts": [t.strip() for t in tokenizer.batch_decode(batch.side(self.eval_role).prompt_ids,
                                                                         skip_special_tokens=True)]}
        if self.eval_role == "student" and (step.teacher is None or step.teacher.in_process):
            self.log("val/loss", step.validation_loss(batch), batch_size=ids.shape[0], sync_dist=True)
            sums = step.mismatch_sums(prompt, ids, mask)
            if sums is not None:
                outputs["mismatch"] = sums.tolist()
        return outputs

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, Batch) else super().transfer_batch_to_device(batch, device,
                                                                                                   dataloader_idx)

    # -- sharding, optimisation and checkpoints ------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under trainer=fsdp: FSDP2 `fully_shard` per transformer block, then per model, student and teacher."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDP2Strategy) or is_sharded(self.student):
            return  # Lightning calls this hook before fit and before each validate: shard once
        mesh = self.device_mesh["data_parallel"]
        shard_model(self.student, mesh, strategy.sharding, frozen=False)
        for teacher in self.teachers:
            shard_model(teacher, mesh, strategy.sharding, frozen=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optim.optimizer([p for p in self.student.parameters() if p.requires_grad])
        if self.optim.scheduler is None:
            return optimizer
        scheduler = self.optim.scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints hold what training changed (kdlab.models.export.trained_state: the student, or a LoRA
        student's adapters, never the teacher), the optimizer, the scheduler and the loop's counters: a resume is
        exact. The teacher and a LoRA student's frozen base are rebuilt from their configs (`strict_loading` off)."""
        checkpoint["state_dict"] = trained_state(checkpoint["state_dict"], self.student)
        checkpoint["kdlab_policy_counts"] = (self.onpolicy_steps, self.policy_steps)
        checkpoint["kdlab_teacher_forward_tokens"] = self.teacher_forward_tokens

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.onpolicy_steps, self.policy_steps = checkpoint.get("kdlab_policy_counts", (0, 0))
        self.teacher_forward_tokens = checkpoint.get("kdlab_teacher_forward_tokens", 0)

    def export_student(self, directory: str) -> None:
        """The student alone with its tokenizer, in Hugging Face format (kdlab.models.export). Every process calls
        it: a sharded student is gathered first (a collective), then rank 0 writes."""
        export_student(self.student, self.step.tokenizer, directory, self.global_rank)


class ForwardTokens:
    """Counts the tokens the models' forward passes read (padding included: what they compute on), through a hook on
    each one's input embeddings, which every pass goes through once (scoring, hidden states, sampling with a KV cache:
    one token per row and step). Times 2 x parameters, roughly a pass's FLOPs: the teacher's compute in training is
    logged per step as train/teacher_forward_tokens and in total as train/teacher_forward_tokens_total."""

    def __init__(self, models: list[torch.nn.Module]):
        self.count = 0
        embeddings = [unwrap(model).get_input_embeddings() for model in models]
        self.hooks = [e.register_forward_pre_hook(self._count) for e in embeddings if e is not None]

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            self.count += args[0].numel()

    def take(self) -> int:
        """The tokens counted since the last call."""
        count, self.count = self.count, 0
        return count

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def shards_models(strategy: Any) -> bool:
    """Whether `strategy` shards the models' parameters: every forward pass is then a collective, so a batch is
    scored in one group and ranks sample in lockstep (a rank that finished keeps stepping until all have). DDP
    replicas score and sample independently."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def _all_reduce_sum(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each value summed over processes, in one all-reduce (every process holds the same names)."""
    names = sorted(values)
    stacked = torch.stack([values[name] for name in names])
    if world_size() > 1:
        dist.all_reduce(stacked)
    return dict(zip(names, stacked))

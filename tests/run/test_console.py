"""What a run prints: every line once, no known noise, a step bar within 80 columns, and the end-of-run lines."""

import io
import logging
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch
from tqdm import tqdm

from kdlab.run.console import (
    LEAFSPEC_WARNING,
    LITLOGGER_TIP,
    LITLOGGER_TIP_LOGGER,
    ConsoleFormatter,
    format_duration,
    quiet_weight_bars,
    run_end_lines,
    setup_console,
    weight_files_bytes,
)
from kdlab.run.progress import StepProgressBar, bar_metrics, compact_count
from tests.conftest import REPO

NOISE = (LEAFSPEC_WARNING, "litlogger", "`weights_only` was not set", "Loading weights", "Writing model shards",
         "transfer_batch_to_device", "log_every_n_steps", "Validation", "loss.fused")


def test_bar_metrics_take_short_names_and_compact_values():
    logged = {"train/loss": torch.tensor(0.0085822), "train/tokens_per_sec": 123456.0,
              "train/onpolicy_fraction": 0.5, "train/jsd": 0.1, "val/accuracy": 0.3}
    assert bar_metrics(logged) == {"loss": "0.00858", "tok/s": "123k", "onpol": "0.50"}
    assert bar_metrics({"train/reward": 0.25}) == {"reward": "0.25"}
    assert [compact_count(v) for v in (137.4, 9999, 12345, 1234567)] == ["137", "9999", "12.3k", "1.23M"]


def _train_bar_line(step: int, max_steps: int, elapsed: float, metrics: dict, monkeypatch) -> str:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    bar = StepProgressBar().init_train_tqdm()
    bar.reset(total=max_steps)
    bar.n = step
    bar.set_postfix(bar_metrics(metrics), refresh=False)
    state = {**bar.format_dict, "elapsed": elapsed}
    line = tqdm.format_meter(**state)
    assert line == tqdm.format_meter(**{**state, "ncols": None})  # nothing was cut to fit
    bar.close()
    return line


def test_progress_bar_shows_step_eta_and_metrics_within_80_columns(monkeypatch):
    """A long reward run: five-digit steps, two hours left, every metric shown."""
    metrics = {"train/loss": 0.0085822, "train/tokens_per_sec": 12345.6, "train/onpolicy_fraction": 0.5,
               "train/reward": -0.1234}
    line = _train_bar_line(12345, 20000, 12000.0, metrics, monkeypatch)
    assert len(line) <= 80, line
    assert line == "step 12345/20000, eta 2:04:01, loss=0.00858 tok/s=12.3k onpol=0.50 reward=-0.123"


def test_progress_bar_eta_follows_the_step_rate(monkeypatch):
    line = _train_bar_line(12, 400, 6.0, {"train/loss": 1.5}, monkeypatch)
    assert line == "step 12/400, eta 03:14, loss=1.5"  # 12 steps in 6 s: 388 left at 2 steps/s


def test_setup_console_silences_the_leafspec_warning_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_console()
        warnings.warn(f"{LEAFSPEC_WARNING}, use `isinstance(treespec, TreeSpec)` instead.", FutureWarning, 1)
        warnings.warn("`foo` is deprecated, use `bar` instead.", FutureWarning, 1)
        warnings.warn(LEAFSPEC_WARNING, UserWarning, 1)  # same text, another category: not the known one
    assert [str(w.message) for w in caught] == ["`foo` is deprecated, use `bar` instead.", LEAFSPEC_WARNING]


def test_setup_console_silences_lightnings_two_notes_on_what_kdlab_does_on_purpose_only():
    transfer = ("You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
                "`LightningDataModule`. It will use the implementation from `LightningModule` instance.")
    interval = ("The number of training batches (4) is smaller than the logging interval Trainer(log_every_n_steps=10)."
                " Set a lower value for log_every_n_steps if you want to see logs for the training epoch.")
    other = "The number of training batches (4) is smaller than something else"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_console()
        for message in (transfer, interval, other):
            warnings.warn(message, UserWarning, 1)
    assert [str(w.message) for w in caught] == [other]


def _console_lines(verbose: bool, records: list[tuple[str, int]]) -> list[str]:
    """What a Hydra-style console handler (ConsoleFormatter) prints of `records` after setup_console(verbose)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        setup_console(verbose=verbose)
        for name, level in records:
            logging.getLogger(name).log(level, f"{name} {logging.getLevelName(level)}")
    finally:
        root.removeHandler(handler)
    return stream.getvalue().splitlines()


def test_plan_lines_reach_the_console_with_verbose_only_and_warnings_always():
    records = [("kdlab.run.build", logging.INFO), ("kdlab.losses.fused", logging.INFO),
               ("kdlab.run.build", logging.WARNING), ("kdlab.step.resilience", logging.INFO)]
    logging.getLogger("kdlab").setLevel(logging.INFO)
    try:
        quiet, verbose = _console_lines(False, records), _console_lines(True, records)
    finally:
        logging.getLogger("kdlab").setLevel(logging.NOTSET)
    assert quiet == ["WARNING: kdlab.run.build WARNING", "kdlab.step.resilience INFO"]
    assert verbose == ["kdlab.run.build INFO", "kdlab.losses.fused INFO", "WARNING: kdlab.run.build WARNING",
                       "kdlab.step.resilience INFO"]


def test_lightnings_set_up_notes_are_plan_lines_and_its_other_info_still_shows():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    lines = ["GPU available: False, used: False", "TPU available: False, using: 0 TPU cores", "Seed set to 0",
             "`Trainer.fit` stopped: `max_steps=3` reached.", "Restoring states from the checkpoint path at x.ckpt"]
    names = ["lightning.pytorch.utilities.rank_zero"] * 2 + ["lightning.fabric.utilities.seed"] + [
        "lightning.pytorch.utilities.rank_zero"] * 2
    printed = {}
    try:
        for verbose in (False, True):
            setup_console(verbose=verbose)
            for name, line in zip(names, lines):
                logger = logging.getLogger(name)
                level, logger.level = logger.level, logging.INFO
                logger.info(line)
                logger.setLevel(level)
            printed[verbose] = stream.getvalue().splitlines()
            stream.seek(0)
            stream.truncate(0)
    finally:
        root.removeHandler(handler)
        setup_console(verbose=False)
    assert printed[False] == ["Restoring states from the checkpoint path at x.ckpt"]  # what a user must see
    assert printed[True] == lines


@pytest.mark.parametrize("overrides, says", [
    ([], "run: task arith, teacher arith-teacher, student arith-student (515k parameters trained), loss jsd(0.5), "
         "policy mixed (student fraction 0.5)"),
    (["student.lora.r=8", "reward=arith_correct"], "student arith-student (4.1k of 515k parameters trained, LoRA r=8)"),
    (["teacher=arith_pair"], "2 teachers, mixture: teacher (arith-teacher) + peer (arith-student)"),
    (["teacher=cached", "teacher.dir=/c", "policy=supervised"], "teacher cached in /c (its top-k read back, no model"),
    (["teacher=remote", "teacher.url=http://h:1"], "teacher remote at http://h:1 (scored by the server, no model"),
    (["teacher=none", "loss=sft", "policy=supervised"], "task arith, no teacher, student"),
])
def test_the_start_line_names_what_runs(overrides, says):
    from kdlab.run.console import run_start_line
    from kdlab.run.record import run_choices
    from tests.conftest import compose

    trainable = 4096 if "student.lora.r=8" in overrides else 515_000
    line = run_start_line(run_choices(compose(overrides)), trainable, 515_000)
    assert says in line and "\n" not in line, line
    if "reward=arith_correct" in overrides:
        assert line.endswith(", reward FinalAnswerCorrect")


def test_setup_console_drops_the_litlogger_tip_and_keeps_other_lightning_info():
    setup_console()
    setup_console()  # each run calls it: one filter, not one per call
    logger = logging.getLogger(LITLOGGER_TIP_LOGGER)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.info(LITLOGGER_TIP + " to enable LitLogger, which logs metrics and artifacts automatically.")
        logger.info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records == ["GPU available: False, used: False"]
    assert len(logger.filters) == 1


def test_console_formatter_prints_info_bare_and_labels_the_rest():
    formatter = ConsoleFormatter("%(message)s")

    def line(level: int) -> str:
        return formatter.format(logging.LogRecord("x", level, __file__, 1, "checkpoint saved", None, None))

    assert line(logging.INFO) == "checkpoint saved"
    assert line(logging.WARNING) == "WARNING: checkpoint saved"


def test_weight_bars_hide_for_small_weights_only():
    from transformers.utils import logging as hf_logging

    def shown(desc: str) -> bool:
        out = io.StringIO()
        for _ in hf_logging.tqdm(range(3), desc=desc, file=out):
            pass
        return desc in out.getvalue()

    with quiet_weight_bars(10_000):
        assert not shown("Loading weights") and not shown("Writing model shards")
        assert shown("Fetching 3 files")  # downloads and any other bar still show
    with quiet_weight_bars(2 << 30):
        assert shown("Loading weights")  # a large model's load takes long enough to watch
    with quiet_weight_bars(None):
        assert shown("Loading weights")
    assert shown("Loading weights")  # the hook is gone after the block


def test_weight_files_bytes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1234)
    (tmp_path / "config.json").write_text("{}")
    assert weight_files_bytes(str(tmp_path)) == 1234
    assert weight_files_bytes(str(tmp_path / "missing")) is None
    assert weight_files_bytes("nobody/not-a-cached-model") is None  # not on disk: its download shows its bars


def test_format_duration():
    assert [format_duration(s) for s in (34.24, 272, 7500)] == ["34.2 s", "4 min 32 s", "2 h 05 min"]


def test_run_end_lines(tmp_path):
    results = {"wall_time_s": 247.2, "tokens_per_sec": 3912.4}
    lines = run_end_lines(272.0, results, tmp_path / "run", tmp_path / "run" / "student").splitlines()
    assert lines == ["wall time: 4 min 32 s (training 4 min 7 s, 3912 tok/s)", f"student: {tmp_path}/run/student",
                     f"run directory: {tmp_path}/run", f"compare with other runs: kdlab-report {tmp_path}"]
    assert "not saved (export=false)" in run_end_lines(1.0, results, tmp_path, None)


def _final_frames(output: str) -> list[str]:
    """Each line as a terminal shows it in the end: the text after its last carriage return (bar frames)."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in output.split("\n")]


@pytest.mark.slow
def test_train_py_debug_limit_console(tmp_path):
    """The issue's newcomer run: every line once, no known noise, the step bar, the end lines, and the printed
    comparison command works."""
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "train.py", "debug=limit", f"hydra.run.dir={run_dir}"], cwd=REPO,
                          capture_output=True, timeout=900)  # bytes: text mode would turn bar frames into lines
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output[-3000:]
    for noise in NOISE:
        assert noise not in output, noise
    lines = [line for line in _final_frames(output) if line.strip()]
    repeated = [line for line, count in Counter(lines).items() if count > 1]
    assert not repeated, repeated
    log = (run_dir / "train.log").read_text()
    for note in ("Seed set to 0", "GPU available: ", "`Trainer.fit` stopped: "):  # Lightning's set-up notes: plan
        assert note in log and note not in output, note                         # lines, in the log only
    start = [line for line in lines if line.startswith("run: ")]
    assert start == ["run: task arith, teacher arith-teacher, student arith-student (515k parameters trained), "
                     "loss jsd(0.5), policy mixed (student fraction 0.5)"]
    assert "loss.fused: " in log  # the plan line: in the log, not on the console
    frames = [frame for line in output.split("\n") for frame in line.split("\r")]
    bar_frames = [frame for frame in frames if frame.startswith(("step ", "scoring"))]
    assert len(bar_frames) > 4 and all(len(frame) <= 80 for frame in bar_frames), max(bar_frames, key=len)
    bar = [line for line in lines if line.startswith("step 4/4, eta ")]
    assert len(bar) == 1 and all(f"{name}=" in bar[0] for name in ("loss", "tok/s", "onpol")), bar
    assert "Epoch" not in output
    assert any(line.startswith("wall time: ") for line in lines)
    assert f"student: {run_dir / 'student'}" in lines
    command = f"compare with other runs: kdlab-report {tmp_path}"
    assert command in lines
    from kdlab.report.cli import main as report

    assert report([str(tmp_path)]) == 0 and (tmp_path / "report.md").is_file()

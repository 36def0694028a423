"""What a run prints: each log line once, no known third-party noise, and an end summary (the progress bar is in
kdlab.run.progress). Silencing is by exact message, never by category or level: a warning that could matter still shows.

Light to import (no Lightning, no transformers at module level): Hydra's logging config loads ConsoleFormatter
before a config error is reported.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

# torch deprecated LeafSpec; Lightning's `_pytree` still builds one on every validation. Nothing a user can change.
LEAFSPEC_WARNING = "`isinstance(treespec, LeafSpec)` is deprecated"
# Lightning advertises its cloud logger whenever it is not in use.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
LITLOGGER_TIP_LOGGER = "lightning.pytorch.utilities.rank_zero"
# Lightning's notes on what kdlab does on purpose: the module moves its own batches (the datamodule's are the
# module's types), and runs bounded by max_steps log by step, whatever an epoch's length.
TRANSFER_WARNING = ("You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
                    "`LightningDataModule`")
LOG_INTERVAL_WARNING = (r"The number of training batches \(\d+\) is smaller than the logging interval "
                        r"Trainer\(log_every_n_steps=")
# Loggers whose INFO records are the run's plan (e.g. `loss.fused: ...`): in train.log always, on the console with
# verbose=true only. Their warnings always show.
PLAN_LOGGERS = ("kdlab.run.build", "kdlab.losses.fused")
# transformers' per-tensor bars, which flash by for a model that loads or saves in about a second.
WEIGHT_BARS = frozenset({"Loading weights", "Writing model shards"})
SMALL_WEIGHTS_BYTES = 1 << 30
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# Lightning's INFO notes on its own set-up and stop: which accelerators exist, the seed, why fit ended (the run's
# start line and end summary say what matters of them). Plan lines: train.log keeps them, the console with verbose.
LIGHTNING_PLAN_MESSAGES = ("GPU available: ", "TPU available: ", "HPU available: ", "Seed set to ",
                           "`Trainer.fit` stopped: ")


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes` (exact text, not a pattern)."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class ConsoleFormatter(logging.Formatter):
    """INFO lines as their bare message (the run's narrative), anything louder with its level, so it stands out.

    Hydra's console handler uses it (conf/hydra/job_logging/kdlab.yaml); train.log keeps time stamps and names."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


class HidePlan(logging.Filter):
    """Drops the plan lines below WARNING from a console handler: the plan loggers' records (PLAN_LOGGERS) and
    Lightning's set-up notes (LIGHTNING_PLAN_MESSAGES, by exact start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.name.startswith(PLAN_LOGGERS):
            return False
        return not (record.name.startswith(LIGHTNING_LOGGERS) and record.getMessage().startswith(
            LIGHTNING_PLAN_MESSAGES))


def setup_console(verbose: bool = False) -> None:
    """Silence the known noise and make every log record print once; the run's plan lines reach the console only
    when `verbose` (the log file keeps them). Idempotent, so each run may call it."""
    warnings.filterwarnings("ignore", message=re.escape(LEAFSPEC_WARNING), category=FutureWarning)
    warnings.filterwarnings("ignore", message=re.escape(TRANSFER_WARNING))
    warnings.filterwarnings("ignore", message=LOG_INTERVAL_WARNING)
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, ConsoleFormatter):  # Hydra's console handler (conf/hydra/job_logging)
            for old in [f for f in handler.filters if isinstance(f, HidePlan)]:
                handler.removeFilter(old)
            if not verbose:
                handler.addFilter(HidePlan())
    tip_logger = logging.getLogger(LITLOGGER_TIP_LOGGER)
    if not any(isinstance(f, DropMessages) for f in tip_logger.filters):
        tip_logger.addFilter(DropMessages((LITLOGGER_TIP,)))
    route_lightning_logs_to_root()


def route_lightning_logs_to_root() -> None:
    """Under a configured root logger (Hydra's console and log file), Lightning's own console handlers print each
    of its records a second time. Lightning already defers to the root logger for `lightning.pytorch` when the root
    has handlers at its import, but its top `lightning` package adds a handler unconditionally: remove them all."""
    if not logging.getLogger().handlers:
        return  # nothing else would print Lightning's records
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout):
                logger.removeHandler(handler)
        logger.propagate = True


@contextlib.contextmanager
def quiet_weight_bars(weight_bytes: int | None) -> Iterator[None]:
    """Within the block, transformers' `Loading weights` and `Writing model shards` bars stay hidden when the
    weights are under SMALL_WEIGHTS_BYTES (None: size unknown, bars shown); every other bar (downloads) shows."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5; older ones have no such bars
    if set_hook is None or weight_bytes is None or weight_bytes >= SMALL_WEIGHTS_BYTES:
        yield
        return
    previous = getattr(hf_logging, "_tqdm_hook", None)  # no getter: read it to chain to it and put it back

    def hook(factory: Any, args: tuple, kwargs: dict) -> Any:
        if kwargs.get("desc") in WEIGHT_BARS:
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


def weight_files_bytes(source: str, revision: str | None = None) -> int | None:
    """Bytes of the weight files a `from_pretrained(source)` would read from disk: a local folder, or the hub
    cache's snapshot of a model name; None when they are not on disk yet (a download shows its own bars)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(source, "config.json", revision=revision)
        except ValueError:  # not a valid repository name
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    files = [p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern)]
    return sum(p.stat().st_size for p in files) if files else None


# -- start of a run --------------------------------------------------------------------------------------------------
def format_count(value: int) -> str:
    """999 -> '999', 12345 -> '12.3k', 1234567 -> '1.23M', 7e9 -> '7B'."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


def teacher_words(teacher: Mapping[str, Any] | None) -> str:
    """The teacher as the start line names it, saying why there is no model where there is none here."""
    if teacher is None:
        return "no teacher"
    kind = teacher.get("kind")
    if kind == "several":
        names = " + ".join(f"{name} ({teacher_words(member).removeprefix('teacher ')})"
                           for name, member in (teacher.get("members") or {}).items())
        return f"{len(teacher.get('members') or {})} teachers, {teacher.get('combine')}: {names}"
    if kind == "cached":
        return f"teacher cached in {teacher.get('dir')} (its top-k read back, no model loaded)"
    if kind == "remote":
        return f"teacher remote at {teacher.get('url')} (scored by the server, no model loaded)"
    return f"teacher {teacher.get('name')}"


def run_start_line(choices: Mapping[str, Any], trainable: int, total: int) -> str:
    """One line that says what runs: task, teacher, student with its trainable parameters, loss, policy (and reward,
    sampling engine when not the default). `choices` are kdlab.run.record.run_choices'."""
    lora = choices.get("lora")
    params = (f"{format_count(trainable)} of {format_count(total)} parameters trained, LoRA r={lora['r']}" if lora
              else f"{format_count(trainable)} parameters trained")
    policy = choices["policy"]
    parts = [f"task {choices['task']}", teacher_words(choices.get("teacher")),
             f"student {choices['student']['name']} ({params})", f"loss {choices['loss']['label']}",
             f"policy {policy['name']} (student fraction {policy['student_fraction']:g})"]
    if choices.get("reward"):
        parts.append(f"reward {choices['reward']['name']}")
    if choices.get("sampling_engine", "hf") != "hf":
        parts.append(f"sampling {choices['sampling_engine']}")
    return "run: " + ", ".join(parts)


# -- end of a run ----------------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """34.2 -> '34.2 s', 272 -> '4 min 32 s', 7500 -> '2 h 05 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def run_end_lines(total_seconds: float, results: Mapping[str, Any], output_dir: Path, student_dir: Path | None) -> str:
    """What follows the results table: where the time went, where the student is, how to compare runs.

    `kdlab-report` takes any folder of run directories: the run's parent holds its siblings (the day's runs, or a
    sweep's jobs), so the command compares this run with those beside it."""
    train_time = results.get("train_time_s", results.get("wall_time_s", 0.0))  # results of older runs: wall_time_s
    training = f"training {format_duration(train_time)}, {results['tokens_per_sec']:.0f} tok/s"
    lines = [
        f"wall time: {format_duration(total_seconds)} ({training})",
        f"student: {student_dir}" if student_dir is not None else "student: not saved (export=false)",
        f"run directory: {output_dir}",
        f"compare with other runs: kdlab-report {output_dir.parent}",
    ]
    return "\n".join(lines)

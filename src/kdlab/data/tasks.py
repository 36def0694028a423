"""Tasks: where examples come from, how they become prompt and target text, and how generations are scored.

A task config (`conf/task/*.yaml`) is checked against `TaskConfig` at start-up, so a misspelt field fails with the
closest valid name instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from kdlab.data.arith import ArithSpec, make_splits

SOURCES = ("arith",)


@dataclass(frozen=True)
class TaskConfig:
    """Every field a task config may hold. Text templates use Python `str.format` with the example's fields."""

    name: str
    source: str = "arith"
    metric: str = "gsm8k_accuracy"  # a folder of kdlab/metrics
    metric_key: str = "accuracy"  # which of the metric's outputs is the task's headline number
    prompt_template: str = "Question: {question}\nAnswer:"
    target_template: str = " {answer}"
    reference_field: str = "answer"
    # synthetic data (source=arith)
    train_size: int = 4000
    val_size: int = 200
    data_seed: int = 1234
    spec: Mapping[str, Any] = field(default_factory=dict)
    # lengths in tokens: prompts keep their end (nearest the answer), targets keep their start
    max_prompt_tokens: int = 256
    max_target_tokens: int = 160
    batch_size: int = 16
    eval_batch_size: int = 64
    eval_examples: int = 200
    # how validation generates (greedy by default)
    generation: Mapping[str, Any] = field(default_factory=lambda: {"max_new_tokens": 160, "do_sample": False})


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig))


def task_config_errors(task_cfg: Mapping[str, Any]) -> list[str]:
    """Problems with a task node, each naming the key and the fix."""
    errors = []
    for key in task_cfg:
        if key not in TASK_FIELDS:
            close = difflib.get_close_matches(str(key), TASK_FIELDS, n=1)
            hint = f"did you mean task.{close[0]}?" if close else f"known fields: {', '.join(TASK_FIELDS)}"
            errors.append(f"task.{key} is not a task field; {hint}")
    if task_cfg.get("source", "arith") not in SOURCES:
        errors.append(f"task.source={task_cfg.get('source')!r} is unknown; choose one of {SOURCES}")
    spec_fields = {f.name for f in dataclasses.fields(ArithSpec)}
    for key in task_cfg.get("spec") or {}:
        if key not in spec_fields:
            errors.append(f"task.spec.{key} is not an arith knob; known: {', '.join(sorted(spec_fields))}")
    for key in ("train_size", "val_size", "batch_size", "eval_batch_size", "max_prompt_tokens", "max_target_tokens"):
        if key in task_cfg and int(task_cfg[key]) < 1:
            errors.append(f"task.{key}={task_cfg[key]} must be a positive integer")
    return errors


class Task:
    """Turns examples into prompt/target/reference text and scores generated text with the task's metric."""

    def __init__(self, config: TaskConfig):
        self.config = config
        self._metric = None

    @classmethod
    def from_config(cls, task_cfg: Mapping[str, Any]) -> "Task":
        errors = task_config_errors(task_cfg)
        if errors:
            raise ValueError("; ".join(errors))
        return cls(TaskConfig(**dict(task_cfg)))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def metric_name(self) -> str:
        """The key the task's headline metric is reported under (e.g. `accuracy`)."""
        return self.config.metric_key

    def splits(self) -> dict[str, list[dict]]:
        c = self.config
        return make_splits(c.train_size, c.val_size, seed=c.data_seed, spec=ArithSpec(**dict(c.spec)))

    def prompt(self, example: Mapping[str, Any]) -> str:
        return self.config.prompt_template.format(**example)

    def target(self, example: Mapping[str, Any]) -> str:
        return self.config.target_template.format(**example)

    def reference(self, example: Mapping[str, Any]) -> str:
        return str(example[self.config.reference_field])

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        if self._metric is None:
            from kdlab.metrics import load_metric  # evaluate is slow to import; only scoring needs it

            self._metric = load_metric(self.config.metric)
        result = self._metric.compute(predictions=list(predictions), references=list(references))
        return {key: float(value) for key, value in result.items()}

"""Tasks: where examples come from, how they become prompt and target text, and how generations are scored.

A task config (`conf/task/*.yaml`) is checked against `TaskConfig` at start-up, so a misspelt field fails with the
closest valid name instead of being silently ignored.

Templates are Python `str.format` strings over the example's fields; nested fields are reached with dots or brackets
(`{translation.en}`, `{translation[en]}`). With `template_format: jinja` they are Jinja2 templates instead, for
prompts with optional parts (Dolly's `{% if context %}...{% endif %}`).

Cleaning rule: an example whose required field (one a template or the reference uses, minus `optional_fields`) is
missing, null or blank is dropped and counted by field, in `Task.report`. Length limits are applied later, per
tokenizer, by `kdlab.data.datamodule`.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from kdlab.data.arith import ArithSpec, make_splits
from kdlab.data.quality import DataReport
from kdlab.data.sources import DataSpec, data_spec_errors, load_split

SOURCES = ("arith", "dataset")
TEMPLATE_FORMATS = ("format", "jinja")
CHAT_TEMPLATE_MODES = ("auto", "never")
LONG_EXAMPLE_RULES = ("truncate", "skip")


@dataclass(frozen=True)
class TaskConfig:
    """Every field a task config holds. The values live in `conf/task/` only (`_defaults.yaml`, then the task's own
    file); code that builds a task outside `train.py` composes them (kdlab.run.compose.task_node)."""

    name: str
    source: str  # "arith": generated in process; "dataset": `data` (hub dataset or local files)
    data: Mapping[str, Any] | None  # see kdlab.data.sources.DataSpec
    metric: str  # a folder of kdlab/metrics
    metric_key: str  # which of the metric's outputs is the task's headline number
    prompt_template: str
    target_template: str
    reference_field: str
    template_format: str
    optional_fields: Sequence[str]  # fields a template may use that can be blank (Dolly's context)
    chat_template: str  # "auto": wrap the prompt in the tokenizer's chat template when it has one
    few_shot: int  # solved training examples put before each prompt (removed from the training set)
    few_shot_separator: str
    truncate_field: str | None  # a prompt too long is shortened by cutting the end of this field first
    long_examples: str  # training examples over a length limit: "truncate" or "skip"
    train_size: int | None  # arith: examples generated; dataset: a seeded sample of this many (null: all)
    val_size: int  # arith: examples generated; dataset: held out from train when splits.validation is null
    data_seed: int
    spec: Mapping[str, Any]  # arith knobs (kdlab.data.arith.ArithSpec)
    # lengths in tokens: prompts keep their end (nearest the answer), targets keep their start
    max_prompt_tokens: int
    max_target_tokens: int
    batch_size: int
    eval_batch_size: int
    eval_examples: int | None  # the first this many validation examples are scored (null: all)
    generation: Mapping[str, Any]  # how validation generates (greedy by default; num_beams > 1 for beam search)
    # chat-format data as TRL takes it: the field holding each example's [{"role", "content"}, ...] conversation; the
    # last message is the assistant's answer (target and reference), the ones before it the prompt. Replaces the
    # templates and reference_field (null: the templates apply)
    messages_field: str | None


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig))


def task_config_errors(task_cfg: Mapping[str, Any]) -> list[str]:
    """Problems with a task node, each naming the key and the fix."""
    missing = [key for key in TASK_FIELDS if key not in task_cfg]
    errors = [f"task {task_cfg.get('name', '?')} lacks {', '.join(missing)}: a task file lists `_defaults` first in "
              f"its defaults list, and code builds a task node with kdlab.run.compose.task_node"] if missing else []
    for key in task_cfg:
        if key not in TASK_FIELDS:
            close = difflib.get_close_matches(str(key), TASK_FIELDS, n=1)
            hint = f"did you mean task.{close[0]}?" if close else f"known fields: {', '.join(TASK_FIELDS)}"
            errors.append(f"task.{key} is not a task field; {hint}")
    source = task_cfg.get("source", "arith")
    if source not in SOURCES:
        errors.append(f"task.source={source!r} is unknown; choose one of {SOURCES}")
    if source == "dataset":
        errors += data_spec_errors(task_cfg.get("data") or {})
    spec_fields = {f.name for f in dataclasses.fields(ArithSpec)}
    for key in task_cfg.get("spec") or {}:
        if key not in spec_fields:
            errors.append(f"task.spec.{key} is not an arith knob; known: {', '.join(sorted(spec_fields))}")
    for key in ("val_size", "batch_size", "eval_batch_size", "max_prompt_tokens", "max_target_tokens"):
        if key in task_cfg and int(task_cfg[key]) < 1:
            errors.append(f"task.{key}={task_cfg[key]} must be a positive integer")
    for key in ("train_size", "eval_examples"):
        if task_cfg.get(key) is not None and int(task_cfg[key]) < 1:
            errors.append(f"task.{key}={task_cfg[key]} must be a positive integer, or null for all")
    from kdlab.sampling.base import SamplingSettings

    generation_keys = {f.name for f in dataclasses.fields(SamplingSettings)}
    for key in task_cfg.get("generation") or {}:
        if key not in generation_keys:
            known = ", ".join(sorted(generation_keys))
            errors.append(f"task.generation.{key} is not a generation setting; known: {known}")
    if int((task_cfg.get("generation") or {}).get("num_beams", 1)) < 1:
        errors.append("task.generation.num_beams must be >= 1 (1: greedy or sampling; more: beam search)")
    if int(task_cfg.get("few_shot", 0)) < 0:
        errors.append(f"task.few_shot={task_cfg['few_shot']} must be >= 0")
    for key, allowed in (("template_format", TEMPLATE_FORMATS), ("chat_template", CHAT_TEMPLATE_MODES),
                         ("long_examples", LONG_EXAMPLE_RULES)):
        if key in task_cfg and task_cfg[key] not in allowed:
            errors.append(f"task.{key}={task_cfg[key]!r} is unknown; choose one of {allowed}")
    if task_cfg.get("messages_field"):
        for key in ("few_shot", "truncate_field"):
            if task_cfg.get(key):
                errors.append(f"task.{key} does not apply to chat-format data (task.messages_field); set it to "
                              f"{0 if key == 'few_shot' else 'null'}, or put exemplars in the conversations")
    if not errors:
        try:
            Task(TaskConfig(**dict(task_cfg))).required_fields()
        except Exception as err:  # a template that does not parse
            errors.append(f"task templates: {err}")
    return errors


def field_path(path: str) -> list[str]:
    """The keys of a field path: `summary`, `translation.de` or `translation[de]` -> ["translation", "de"]."""
    return re.split(r"[.\[\]]+", path.strip(".[]"))


def lookup(example: Mapping[str, Any], path: str) -> Any:
    """The value at a field path (see `field_path`); KeyError when absent."""
    value: Any = example
    for part in field_path(path):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def with_field(example: Mapping[str, Any], path: str, value: Any) -> dict:
    """A copy of `example` with the field at `path` (see `field_path`) replaced."""
    head, *rest = field_path(path)
    out = dict(example)
    out[head] = with_field(example[head], ".".join(rest), value) if rest else value
    return out


def conversation_problem(messages: Any, field: str) -> str | None:
    """Why a chat-format example cannot train (a drop reason), or None: `field` must be a list of {"role", "content"}
    messages whose last one is the assistant's non-blank answer, after at least one message to answer."""
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m and "content" in m
                                                 for m in messages):
        return f"{field} is not a list of {{role, content}} messages"
    if not messages or messages[-1]["role"] != "assistant" or not str(messages[-1]["content"]).strip():
        return f"{field} does not end with an assistant's answer"
    if len(messages) < 2:
        return f"{field} has no message before the answer"
    return None


class _FieldFormatter(string.Formatter):
    """`str.format` whose field names are paths into nested records (dicts have no attributes to reach with dots)."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, str]:
        return lookup(kwargs, field_name), field_name


_FORMATTER = _FieldFormatter()


class Task:
    """Turns examples into prompt/target/reference text and scores generated text with the task's metric."""

    def __init__(self, config: TaskConfig):
        self.config = config
        self.report = DataReport()
        self._metric = None
        self._few_shot_prefix = ""
        self._splits: dict[str, list[dict]] | None = None
        self._jinja: dict[str, Any] = {}

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

    # -- text -------------------------------------------------------------------------------------------------------
    def _render(self, template: str, example: Mapping[str, Any]) -> str:
        if self.config.template_format == "jinja":
            if template not in self._jinja:
                import jinja2

                env = jinja2.Environment(keep_trailing_newline=True)  # required fields are checked before rendering
                self._jinja[template] = env.from_string(template)
            return self._jinja[template].render(**example)
        return _FORMATTER.vformat(template, (), example)

    def conversation(self, example: Mapping[str, Any]) -> list[dict[str, str]] | None:
        """The messages before the answer of a chat-format example (what a chat template renders as the prompt),
        None for a task of templates."""
        if not self.config.messages_field:
            return None
        return [{"role": str(m["role"]), "content": str(m["content"])}
                for m in lookup(example, self.config.messages_field)[:-1]]

    def prompt(self, example: Mapping[str, Any]) -> str:
        """The prompt text, after the few-shot exemplars when the task has them. Chat-format data without a chat
        template reads `role: content` lines ending in `assistant:` (a tokenizer's chat template replaces this:
        kdlab.data.datamodule)."""
        conversation = self.conversation(example)
        if conversation is not None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"
        return self._few_shot_prefix + self._render(self.config.prompt_template, example)

    def target(self, example: Mapping[str, Any]) -> str:
        if self.config.messages_field:
            return " " + self.reference(example)  # after `assistant:`, as the templates put a space before answers
        return self._render(self.config.target_template, example)

    def reference(self, example: Mapping[str, Any]) -> str:
        if self.config.messages_field:
            return str(lookup(example, self.config.messages_field)[-1]["content"])
        return str(lookup(example, self.config.reference_field))

    def required_fields(self) -> list[str]:
        """Field paths every example must hold, non-blank: those the templates and the reference use."""
        c = self.config
        if c.messages_field:
            return [c.messages_field]
        if c.template_format == "jinja":
            import jinja2
            from jinja2 import meta

            env = jinja2.Environment()
            names = set()
            for template in (c.prompt_template, c.target_template):
                names |= meta.find_undeclared_variables(env.parse(template))
        else:
            names = {
                name
                for template in (c.prompt_template, c.target_template)
                for _, name, _, _ in string.Formatter().parse(template)
                if name
            }
        names.add(c.reference_field)
        return sorted(n for n in names if n not in set(c.optional_fields))

    # -- data -------------------------------------------------------------------------------------------------------
    def splits(self) -> dict[str, list[dict]]:
        """{"train": [...], "validation": [...]}: cleaned examples (read once, then cached)."""
        if self._splits is None:
            self._splits = self._load()
        return self._splits

    def _load(self) -> dict[str, list[dict]]:
        c = self.config
        if c.source == "arith":
            raw = make_splits(c.train_size or 4000, c.val_size, seed=c.data_seed, spec=ArithSpec(**dict(c.spec)))
            splits = {name: self._clean(name, rows, Counter()) for name, rows in raw.items()}
        else:
            spec = DataSpec(**dict(c.data or {}))
            hint = f" with fields {', '.join(self.required_fields())}"
            names = {"train": "train", "validation": "validation", **dict(spec.splits or {})}
            train = self._clean("train", *load_split(spec, names["train"], hint))
            if names["validation"]:
                validation = self._clean("validation", *load_split(spec, names["validation"], hint))
            else:  # no validation split (Dolly): hold out a seeded sample of the training set
                random.Random(c.data_seed).shuffle(train)
                validation, train = train[: c.val_size], train[c.val_size :]
                self.report.record_drop("train", "held out for validation", len(validation))
                self.report.record_read("validation", read=len(validation), dropped=Counter())
            if c.train_size is not None and len(train) > c.train_size:
                self.report.record_drop("train", "beyond train_size", len(train) - c.train_size)
                train = random.Random(c.data_seed + 1).sample(train, c.train_size)
            splits = {"train": train, "validation": validation}
        if c.few_shot:
            splits["train"] = self._take_few_shot(splits["train"])
        if c.eval_examples is not None and len(splits["validation"]) > c.eval_examples:
            self.report.record_drop("validation", "beyond eval_examples", len(splits["validation"]) - c.eval_examples)
            splits["validation"] = splits["validation"][: c.eval_examples]
        return splits

    def _clean(self, split: str, rows: list[dict], dropped: Counter) -> list[dict]:
        """Drop rows missing a required field or holding it blank; count every drop by reason."""
        required = self.required_fields()
        read = len(rows) + sum(dropped.values())  # the file reader's drops never reached `rows`
        kept = []
        for row in rows:
            problem = None
            for path in required:
                try:
                    value = lookup(row, path)
                except KeyError:
                    problem = f"missing {path}"
                    break
                if value is None or (isinstance(value, str) and not value.strip()):
                    problem = f"empty {path}"
                    break
            if problem is None and self.config.messages_field:
                problem = conversation_problem(lookup(row, self.config.messages_field), self.config.messages_field)
            if problem:
                dropped[problem] += 1
            else:
                kept.append(row)
        self.report.record_read(split, read=read, dropped=dropped)
        if not kept:
            fields = ", ".join(sorted(rows[0])) if rows else "none"
            raise ValueError(
                f"task {self.name}: every example of the {split} split was dropped "
                f"({self.report.describe_drops(split)}). The task needs fields {', '.join(required)}; "
                f"the first record has fields: {fields}. Fix the data or the task's templates/reference_field."
            )
        return kept

    def _take_few_shot(self, train: list[dict]) -> list[dict]:
        """Pick `few_shot` exemplars from train with the data seed; they leave the training set."""
        c = self.config
        if len(train) <= c.few_shot:
            raise ValueError(f"task.few_shot={c.few_shot} needs more training examples than the {len(train)} there")
        order = list(range(len(train)))
        random.Random(c.data_seed + 2).shuffle(order)
        chosen = set(order[: c.few_shot])
        self.report.record_drop("train", "few-shot exemplars", c.few_shot)
        shots = [train[i] for i in order[: c.few_shot]]
        self._few_shot_prefix = ""
        self._few_shot_prefix = "".join(self.prompt(e) + self.target(e) + c.few_shot_separator for e in shots)
        return [e for i, e in enumerate(train) if i not in chosen]

    # -- scoring ----------------------------------------------------------------------------------------------------
    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return self.score_examples(predictions, references)[0]

    def score_examples(self, predictions: Sequence[str], references: Sequence[str]
                       ) -> tuple[dict[str, float], list[float]]:
        """The metric's scores of all predictions, and the headline metric (`metric_key`) of each prediction alone
        (accuracy 0 or 1, an example's ROUGE, sentence BLEU), so a generations file says which answers counted."""
        if self._metric is None:
            from kdlab.evaluation.metrics import load_metric  # evaluate is slow to import; only scoring needs it

            self._metric = load_metric(self.config.metric)
        result = self._metric.compute(predictions=list(predictions), references=list(references), per_example=True)
        each = result.pop("per_example", {}).get(self.config.metric_key, [])
        return {key: float(value) for key, value in result.items()}, [float(v) for v in each]

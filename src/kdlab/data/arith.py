"""Synthetic GSM8K-style arithmetic word problems: kdlab's offline default task.

Why it exists
-------------
GSM8K (grade-school math word problems) is the usual benchmark for distilling reasoning into small language
models, but it has to be downloaded and its problems are hard enough that only fairly large models get any of them
right. This module generates problems *in GSM8K's exact format* from a seed, with no network, and with knobs that set
how hard they are, so that the whole distillation pipeline (data, training, on-policy sampling, scoring) can run and
be tested anywhere, and so that a teacher of a few million parameters clearly beats a smaller student.

Format
------
Each example is a dict with GSM8K's field names, so the same loader, prompt templates and metric serve both::

    {"question": "Mia has 23 apples. She buys 3 bags with 12 apples in each bag. Then she gives 17 apples to Leo.
                  How many apples does Mia have now?",
     "answer":   "She buys 3 * 12 = 36, so she has 23 + 36 = 59 apples.\\n"
                 "She gives away 17, so she has 59 - 17 = 42 apples.\\n#### 42"}

The question states a starting amount and then ``min_steps..max_steps`` operations (add, subtract, multiply,
exact division, or "k groups of m" added), each of which changes a running total by a number written in the
question. The answer has one line per operation, each a short sentence that shows the computation as
``a op b = c`` (``op`` one of ``+ - * /``), where ``a`` is the previous running total (or a number from the question)
and ``b`` a number copied from the question; a grouped addition shows its product first on the same line. The last
line is ``#### <answer>``, a non-negative integer, which is what GSM8K's scorer (`kdlab.data.answers`) extracts.
To solve a problem a model has to read the question, copy the right numbers in order, and do multi-digit arithmetic,
which is why model size matters on it.

Knobs (`ArithSpec`)
-------------------
``min_steps``/``max_steps``: how many operations a problem chains (uniform in the range, inclusive).
``max_operand``: largest starting amount, addend, subtrahend and group size.
``max_multiplier``: largest multiplier, divisor and number of groups (all at least 2).
``max_total``: largest value the running total (and a group product) may take; an operation that would exceed it,
go negative, or divide inexactly is drawn again.

`make_splits` gives deterministic train/validation(/test) splits that never share a question; `solve_steps`
recomputes an answer from its step lines and is used by the tests as a sanity check.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

__all__ = ["ArithSpec", "generate_problem", "make_splits", "solve_steps", "STEP_PATTERN"]


@dataclass(frozen=True)
class ArithSpec:
    """Difficulty knobs of the generated problems (see the module docstring)."""

    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 99
    max_multiplier: int = 9
    max_total: int = 999

    def __post_init__(self) -> None:
        if self.min_steps < 1:
            raise ValueError(f"min_steps={self.min_steps} must be at least 1")
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps={self.max_steps} must be at least min_steps={self.min_steps}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand={self.max_operand} must be at least 1")
        if self.max_multiplier < 2:
            raise ValueError(f"max_multiplier={self.max_multiplier} must be at least 2")
        if self.max_total < 2:
            raise ValueError(f"max_total={self.max_total} must be at least 2")


# --------------------------------------------------------------------------------------------------------------
# Vocabulary of the templates
# --------------------------------------------------------------------------------------------------------------

# (name, subject pronoun, possessive pronoun)
_PEOPLE = [
    ("Mia", "she", "her"), ("Leo", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
    ("Emma", "she", "her"), ("Liam", "he", "his"), ("Zoe", "she", "her"), ("Omar", "he", "his"),
    ("Sofia", "she", "her"), ("Ben", "he", "his"), ("Lily", "she", "her"), ("Raj", "he", "his"),
    ("Nora", "she", "her"), ("Sam", "he", "his"), ("Grace", "she", "her"), ("Kenji", "he", "his"),
    ("Chloe", "she", "her"), ("Diego", "he", "his"), ("Hana", "she", "her"), ("Max", "he", "his"),
]
_FRIENDS = ["Tom", "Ana", "Eli", "Ivy", "Jack", "Maya", "Owen", "Ruby", "Finn", "Lucy", "Theo", "Jade"]

# Countable things: (plural noun, container used for "k containers with m things in each")
_ITEMS = [
    ("apples", "bags"), ("marbles", "jars"), ("stickers", "sheets"), ("cards", "packs"), ("pencils", "boxes"),
    ("cookies", "trays"), ("shells", "buckets"), ("stamps", "albums"), ("beads", "strings"), ("eggs", "cartons"),
    ("books", "crates"), ("balloons", "packets"), ("toy cars", "boxes"), ("oranges", "baskets"),
]


@dataclass(frozen=True)
class _Context:
    """Everything a template needs about the current problem."""

    name: str
    pron: str  # subject pronoun, lower case
    poss: str  # possessive pronoun, lower case
    obj: str  # plural noun the total counts
    container: str
    money: bool


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# Each template is (question sentence, answer line). Fields: {name} {Pron} {pron} {poss} {Poss} {obj} {container}
# {friend} {n} (new number from the question) {k} {m} (factors of a group) {p} (their product) {t} (running total)
# {r} (result). The question sentence of a step is preceded by an optional connective ("Then", "Later", ...).
_START_ITEMS = [
    "{name} has {n} {obj}.",
    "{name} starts with {n} {obj}.",
    "{name} owns {n} {obj}.",
    "There are {n} {obj} in {name}'s room.",
    "{name} collected {n} {obj} last week.",
]
_START_MONEY = [
    "{name} has {n} dollars.",
    "{name} has saved {n} dollars.",
    "{name} starts the week with {n} dollars.",
    "There are {n} dollars in {name}'s wallet.",
]

_ADD_ITEMS = [
    ("{pron} buys {n} more {obj}.", "{Pron} buys {n} more, so {pron} has {t} + {n} = {r} {obj}."),
    ("{pron} finds {n} more {obj}.", "{Pron} finds {n} more, so {pron} has {t} + {n} = {r} {obj}."),
    ("{friend} gives {name} {n} {obj}.", "{name} gets {n} from {friend}: {t} + {n} = {r} {obj}."),
    ("{pron} gets {n} {obj} as a gift.", "After the gift {pron} has {t} + {n} = {r} {obj}."),
    ("{pron} wins {n} {obj} at a fair.", "{Pron} has {t} + {n} = {r} {obj} after the fair."),
]
_ADD_MONEY = [
    ("{pron} earns {n} dollars.", "{Pron} earns {n}, so {pron} has {t} + {n} = {r} dollars."),
    ("{friend} gives {name} {n} dollars.", "{name} gets {n} from {friend}: {t} + {n} = {r} dollars."),
    ("{pron} finds {n} dollars on the street.", "{Pron} has {t} + {n} = {r} dollars after finding the money."),
    ("{pron} sells an old bike for {n} dollars.", "Selling the bike gives {t} + {n} = {r} dollars."),
]

_SUB_ITEMS = [
    ("{pron} gives {n} {obj} to {friend}.", "{Pron} gives away {n}, so {pron} has {t} - {n} = {r} {obj}."),
    ("{pron} loses {n} {obj}.", "{Pron} loses {n}, so {pron} has {t} - {n} = {r} {obj}."),
    ("{pron} sells {n} of {poss} {obj}.", "After selling {n}, {pron} has {t} - {n} = {r} {obj}."),
    ("{friend} borrows {n} {obj} from {name}.", "{name} lends {n}, leaving {t} - {n} = {r} {obj}."),
    ("{pron} uses {n} {obj} for a school project.", "{Pron} uses {n}: {t} - {n} = {r} {obj} are left."),
]
_SUB_MONEY = [
    ("{pron} spends {n} dollars on a book.", "{Pron} spends {n}, so {pron} has {t} - {n} = {r} dollars."),
    ("{pron} pays {n} dollars for lunch.", "After lunch {pron} has {t} - {n} = {r} dollars."),
    ("{pron} gives {n} dollars to {friend}.", "{Pron} gives away {n}, leaving {t} - {n} = {r} dollars."),
    ("{pron} buys a game for {n} dollars.", "The game costs {n}, so {pron} has {t} - {n} = {r} dollars."),
]

_GROUP_ITEMS = [
    ("{pron} buys {k} {container} with {m} {obj} in each.",
     "{Pron} buys {k} * {m} = {p}, so {pron} has {t} + {p} = {r} {obj}."),
    ("{pron} receives {k} {container} of {m} {obj} each.",
     "{Pron} receives {k} * {m} = {p}, so {pron} has {t} + {p} = {r} {obj}."),
    ("{pron} picks {m} {obj} a day for {k} days.",
     "{Pron} picks {k} * {m} = {p}, so {pron} has {t} + {p} = {r} {obj}."),
]
_GROUP_MONEY = [
    ("{pron} earns {m} dollars a day for {k} days.",
     "{Pron} earns {k} * {m} = {p}, so {pron} has {t} + {p} = {r} dollars."),
    ("{pron} sells {k} cakes for {m} dollars each.",
     "The cakes bring {k} * {m} = {p}, so {pron} has {t} + {p} = {r} dollars."),
]

_MUL_ITEMS = [
    ("{poss} collection grows to {n} times its size.", "{Poss} collection is now {t} * {n} = {r} {obj}."),
    ("{pron} ends up with {n} times as many {obj} as before.", "{Pron} now has {t} * {n} = {r} {obj}."),
]
_MUL_MONEY = [
    ("{poss} savings grow to {n} times as much.", "{Poss} savings are now {t} * {n} = {r} dollars."),
    ("a bank bonus makes {poss} money {n} times as much.", "With the bonus {pron} has {t} * {n} = {r} dollars."),
]

_DIV_ITEMS = [
    ("{pron} shares the {obj} equally among {n} friends and keeps one share.",
     "Each share is {t} / {n} = {r} {obj}, and {pron} keeps one."),
    ("{pron} splits the {obj} equally into {n} {container} and keeps only one.",
     "One of the {container} holds {t} / {n} = {r} {obj}."),
]
_DIV_MONEY = [
    ("{pron} splits the money equally with {n} people in all and keeps one part.",
     "Each part is {t} / {n} = {r} dollars, and {pron} keeps one."),
]

_CONNECTIVES = ["", "", "Then ", "Later, ", "Next, ", "After that, "]

_QUESTION_ITEMS = [
    "How many {obj} does {name} have now?",
    "How many {obj} does {name} have at the end?",
    "How many {obj} does {name} end up with?",
]
_QUESTION_MONEY = [
    "How many dollars does {name} have now?",
    "How much money, in dollars, does {name} have at the end?",
    "How many dollars does {name} end up with?",
]

_OPS = ("add", "sub", "group", "mul", "div")
_OP_WEIGHTS = (3.0, 3.0, 1.5, 1.5, 1.0)


def _templates(op: str, money: bool) -> list:
    table = {
        "add": (_ADD_ITEMS, _ADD_MONEY),
        "sub": (_SUB_ITEMS, _SUB_MONEY),
        "group": (_GROUP_ITEMS, _GROUP_MONEY),
        "mul": (_MUL_ITEMS, _MUL_MONEY),
        "div": (_DIV_ITEMS, _DIV_MONEY),
    }
    return table[op][1 if money else 0]


def _draw_operation(rng: random.Random, op: str, total: int, spec: ArithSpec) -> dict | None:
    """Numbers for one operation on `total`, or None when this operation cannot stay within the spec."""
    if op == "add":
        hi = min(spec.max_operand, spec.max_total - total)
        if hi < 1:
            return None
        n = rng.randint(1, hi)
        return {"n": n, "r": total + n}
    if op == "sub":
        hi = min(spec.max_operand, total - 1)  # keep at least one: a total of 0 makes the next steps degenerate
        if hi < 1:
            return None
        n = rng.randint(1, hi)
        return {"n": n, "r": total - n}
    if op == "group":
        k = rng.randint(2, spec.max_multiplier)
        m = rng.randint(1, spec.max_operand)
        p = k * m
        if p > spec.max_total or total + p > spec.max_total:
            return None
        return {"k": k, "m": m, "p": p, "r": total + p}
    if op == "mul":
        n = rng.randint(2, spec.max_multiplier)
        if total * n > spec.max_total:
            return None
        return {"n": n, "r": total * n}
    if op == "div":
        divisors = [d for d in range(2, spec.max_multiplier + 1) if total % d == 0 and total // d >= 1]
        if not divisors:
            return None
        n = rng.choice(divisors)
        return {"n": n, "r": total // n}
    raise ValueError(f"unknown operation {op!r}")


def generate_problem(rng: random.Random, spec: ArithSpec = ArithSpec()) -> dict:
    """One problem `{"question": str, "answer": str, "steps": int}` drawn from `rng` (the only source of randomness);
    `steps`, the number of operations, lets a run split problems by difficulty (e.g. `teacher.route_field=steps`)."""
    name, pron, poss = rng.choice(_PEOPLE)
    money = rng.random() < 0.3
    obj, container = ("dollars", "envelopes") if money else rng.choice(_ITEMS)
    ctx = _Context(name=name, pron=pron, poss=poss, obj=obj, container=container, money=money)
    friends = [f for f in _FRIENDS if f != name]

    start = rng.randint(1, min(spec.max_operand, spec.max_total))
    steps = rng.randint(spec.min_steps, spec.max_steps)
    fields = {"name": name, "pron": pron, "Pron": _cap(pron), "poss": poss, "Poss": _cap(poss), "obj": obj,
              "container": container}

    sentences = [rng.choice(_START_MONEY if money else _START_ITEMS).format(n=start, **fields)]
    lines = []
    used: set[str] = set()  # a template is not repeated within a problem while another one is available
    total = start
    for index in range(steps):
        numbers = None
        while numbers is None:  # "add" or "sub" always fits (1 <= total <= max_total, max_total >= 2)
            op = rng.choices(_OPS, weights=_OP_WEIGHTS)[0]
            numbers = _draw_operation(rng, op, total, spec)
        templates = _templates(op, ctx.money)
        fresh = [pair for pair in templates if pair[0] not in used] or templates
        question_tpl, answer_tpl = rng.choice(fresh)
        used.add(question_tpl)
        values = dict(fields, friend=rng.choice(friends), t=total, **numbers)
        connective = rng.choice(_CONNECTIVES) if index > 0 else ""
        sentence = question_tpl.format(**values)
        sentences.append(_cap(connective + sentence) if connective else _cap(sentence))
        lines.append(_cap(answer_tpl.format(**values)))
        total = numbers["r"]
    sentences.append(rng.choice(_QUESTION_MONEY if money else _QUESTION_ITEMS).format(**fields))
    lines.append(f"#### {total}")
    return {"question": " ".join(sentences), "answer": "\n".join(lines), "steps": steps}


def _split_rng(seed: int, split: str) -> random.Random:
    """A generator seeded from (seed, split) through SHA-256: stable across processes and Python versions."""
    digest = hashlib.sha256(f"kdlab.arith:{seed}:{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def make_splits(train_size: int, val_size: int, seed: int = 0, spec: ArithSpec = ArithSpec(),
                test_size: int = 0) -> dict[str, list[dict]]:
    """Deterministic splits `{"train", "validation"[, "test"]}` of unique problems; no question is in two splits.

    Each split has its own generator seeded from `seed` and the split name, so the validation set does not change
    when `train_size` does (except that a validation problem equal to a training one is skipped and replaced).
    Raises ValueError when the spec cannot produce enough distinct questions.
    """
    sizes = {"train": train_size, "validation": val_size}
    if test_size > 0:
        sizes["test"] = test_size
    for split, size in sizes.items():
        if size < 0:
            raise ValueError(f"{split} size {size} must be non-negative")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        rng = _split_rng(seed, split)
        examples: list[dict] = []
        attempts, max_attempts = 0, 20 * size + 1000
        while len(examples) < size:
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(f"could only draw {len(examples)} distinct {split} problems out of {size} from "
                                 f"{spec}; enlarge the spec's ranges or ask for fewer problems")
            problem = generate_problem(rng, spec)
            if problem["question"] in seen:
                continue
            seen.add(problem["question"])
            examples.append(problem)
        splits[split] = examples
    return splits


# `a op b = c` with non-negative integers (commas allowed as thousands separators); `x`/`×` are read as `*`.
_NUMBER = r"(\d{1,3}(?:,\d{3})+|\d+)"  # 1234 or 1,234 (a comma not followed by three digits ends the number)
STEP_PATTERN = re.compile(rf"{_NUMBER}\s*([-+*/x×])\s*{_NUMBER}\s*=\s*{_NUMBER}")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def solve_steps(answer: str) -> int:
    """Recompute an answer from its step lines and return the last step's result.

    Every `a op b = c` on the lines before `####` is checked (`c == a op b`, division exact); the value of the last
    one is returned. Raises ValueError on an inconsistent step or when there is no step at all. The `#### x` line
    itself is not read: compare it with the returned value to check a whole answer.
    """
    result = None
    for line in answer.splitlines():
        if line.lstrip().startswith("####"):
            break
        for match in STEP_PATTERN.finditer(line):
            a, op, b, c = _int(match.group(1)), match.group(2), _int(match.group(3)), _int(match.group(4))
            if op == "+":
                expected = a + b
            elif op == "-":
                expected = a - b
            elif op in "*x×":
                expected = a * b
            else:
                if b == 0 or a % b:
                    raise ValueError(f"inexact division in step {match.group(0)!r}")
                expected = a // b
            if expected != c:
                raise ValueError(f"inconsistent step {match.group(0)!r}: {a} {op} {b} is {expected}, not {c}")
            result = c
    if result is None:
        raise ValueError("no `a op b = c` step found in the answer")
    return result

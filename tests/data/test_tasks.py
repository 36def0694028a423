"""Real tasks: loaders for each file format, prompts, references, bad-data rules, hub failure, the real shared files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kdlab.data.datamodule import DistillationDataModule, PromptEncoder, TokenizedExamples, special_affixes
from kdlab.data.files import read_records
from kdlab.data.sources import DataUnavailableError
from kdlab.data.tasks import Task
from kdlab.run.rundir import RESULTS
from tests.conftest import SHARED_DATA, compose

TASKS = ["xsum", "wmt14_en_de", "gsm8k", "instruction", "dialogsum"]

# A few records per task in the hub dataset's own schema.
XSUM = [
    {"document": f"The council said on day {i} that the bridge would close for repairs. Traffic will be diverted.",
     "summary": f"A bridge will close for repairs from day {i}.", "id": str(3000 + i)}
    for i in range(12)
]
WMT = [{"translation": {"de": f"Das Haus Nummer {i} ist klein.", "en": f"House number {i} is small."}}
       for i in range(12)]
GSM8K = [{"question": f"Ann has {i} apples and buys 2 more. How many apples does she have?",
          "answer": f"She has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"} for i in range(12)]
DOLLY = [{"instruction": f"Name {i} colours.", "context": "" if i % 2 else f"Colours seen on day {i}.",
          "response": "Red, green and blue.", "category": "brainstorming"} for i in range(40)]
DIALOGSUM = [{"id": f"train_{i}", "dialogue": f"#Person1#: Are you free at {i}?\n#Person2#: Yes, see you then.",
              "summary": f"#Person1# and #Person2# will meet at {i}.", "topic": "meeting"} for i in range(12)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def task_files(root: Path, name: str) -> Path:
    """A folder laid out as `task.data.path` expects, with the task's records in its real schema."""
    folder = root / name
    if name == "xsum":
        write_jsonl(folder / "train.jsonl", XSUM[:8])
        write_jsonl(folder / "validation.jsonl", XSUM[8:])
    elif name == "wmt14_en_de":
        write_jsonl(folder / "train.jsonl", WMT[:8])
        write_jsonl(folder / "validation.jsonl", WMT[8:])
    elif name == "gsm8k":
        write_jsonl(folder / "train.jsonl", GSM8K[:8])
        write_jsonl(folder / "test.jsonl", GSM8K[8:])
    elif name == "instruction":
        write_jsonl(folder / "train.jsonl", DOLLY)  # Dolly has a train split only
    elif name == "dialogsum":
        write_jsonl(folder / "train.jsonl", DIALOGSUM[:8])
        write_jsonl(folder / "dev.jsonl", DIALOGSUM[8:])  # the original release names it dev
    return folder


def local_task(tmp_path: Path, name: str, *overrides: str) -> Task:
    folder = task_files(tmp_path, name)
    cfg = compose([f"task={name}", f"task.data.path={folder}", *overrides], output_dir=tmp_path / "run")
    return Task.from_config(cfg.task)


# -- each task: loader, prompt, reference ---------------------------------------------------------------------------
EXPECTED_PROMPT = {
    "xsum": "Summarize the following article in one sentence.\n\nArticle: {document}\n\nSummary:",
    "wmt14_en_de": "Translate English to German: {en}\nGerman:",
    "gsm8k": "Question: {question}\nAnswer:",
    "dialogsum": "Summarize the following dialogue.\n\n{dialogue}\n\nSummary:",
}


@pytest.mark.parametrize("name", TASKS)
def test_each_task_loads_its_real_schema_and_renders_prompt_target_reference(name, tmp_path):
    task = local_task(tmp_path, name, "task.val_size=10")
    splits = task.splits()
    if name == "instruction":
        assert (len(splits["train"]), len(splits["validation"])) == (30, 10)  # validation held out from train
    else:
        assert (len(splits["train"]), len(splits["validation"])) == (8, 4)
    example = splits["validation"][0]
    if name == "wmt14_en_de":
        expected = EXPECTED_PROMPT[name].format(en=example["translation"]["en"])
        assert task.target(example) == " " + example["translation"]["de"]
        assert task.reference(example) == example["translation"]["de"]
    elif name == "instruction":
        expected = None
    else:
        expected = EXPECTED_PROMPT[name].format(**example)
        reference = {"xsum": "summary", "gsm8k": "answer", "dialogsum": "summary"}[name]
        assert task.reference(example) == example[reference]
        assert task.target(example) == " " + example[reference]
    if expected is not None:
        assert task.prompt(example) == expected


def test_instruction_prompt_shows_the_input_section_only_when_there_is_context(tmp_path):
    task = local_task(tmp_path, "instruction")
    with_context = task.prompt(DOLLY[0])
    without = task.prompt(DOLLY[1])
    assert "### Input:\nColours seen on day 0.\n\n### Response:\n" in with_context
    assert "### Input" not in without and without.endswith("### Instruction:\nName 1 colours.\n\n### Response:\n")
    assert task.target(DOLLY[0]) == "Red, green and blue."


def test_a_held_out_validation_split_is_seeded_and_disjoint(tmp_path):
    a = local_task(tmp_path, "instruction", "task.val_size=10").splits()
    b = local_task(tmp_path, "instruction", "task.val_size=10").splits()
    c = local_task(tmp_path, "instruction", "task.val_size=10", "task.data_seed=7").splits()
    assert a == b and a["validation"] != c["validation"]
    assert not {e["instruction"] for e in a["train"]} & {e["instruction"] for e in a["validation"]}


def test_train_size_draws_a_seeded_sample(tmp_path):
    task = local_task(tmp_path, "xsum", "task.train_size=5")
    train = task.splits()["train"]
    assert len(train) == 5 and all(e in XSUM[:8] for e in train)
    assert task.report.to_dict()["train"]["dropped"] == {"beyond train_size": 3}


# -- file formats ---------------------------------------------------------------------------------------------------
def test_jsonl_json_csv_and_parquet_hold_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", WMT)
    (tmp_path / "b.json").write_text(json.dumps(WMT))
    (tmp_path / "c.json").write_text(json.dumps({"data": WMT}))
    with (tmp_path / "d.csv").open("w", newline="") as f:  # nested fields as dotted columns
        writer = csv.DictWriter(f, fieldnames=["translation.en", "translation.de"])
        writer.writeheader()
        writer.writerows({"translation.en": r["translation"]["en"], "translation.de": r["translation"]["de"]}
                         for r in WMT)
    pq.write_table(pa.Table.from_pylist(WMT), tmp_path / "e.parquet")
    for name in ("a.jsonl", "b.json", "c.json", "d.csv", "e.parquet"):
        records, dropped = read_records(tmp_path / name)
        assert records == WMT and not dropped, name


def test_a_split_can_name_its_file_and_a_missing_file_lists_what_is_there(tmp_path):
    folder = task_files(tmp_path, "xsum")
    (folder / "validation.jsonl").rename(folder / "held_out.jsonl")
    cfg = compose(["task=xsum", f"task.data.path={folder}", "task.data.splits.validation=held_out.jsonl"])
    assert len(Task.from_config(cfg.task).splits()["validation"]) == 4
    cfg = compose(["task=xsum", f"task.data.path={folder}"])
    with pytest.raises(DataUnavailableError, match="no file for split 'validation'.*held_out.jsonl, train.jsonl"):
        Task.from_config(cfg.task).splits()


# -- bad data -------------------------------------------------------------------------------------------------------
def test_bad_records_are_dropped_by_stated_rules_and_counted(tmp_path):
    folder = tmp_path / "xsum"
    good = [json.dumps(r).encode() for r in XSUM[:6]]
    lines = good + [
        json.dumps({"document": "   ", "summary": "s", "id": "1"}).encode(),  # blank required field
        json.dumps({"document": "d", "id": "2"}).encode(),  # missing required field
        json.dumps({"document": "d", "summary": None, "id": "3"}).encode(),  # null required field
        b'{"document": "caf\xe9 au lait", "summary": "s"}',  # Latin-1 byte: not UTF-8
        b'{"document": "truncated',  # not JSON
        b"[1, 2]",  # JSON, but not a record
        b"",  # blank line: not a record, not counted
    ]
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    write_jsonl(folder / "validation.jsonl", XSUM[8:])
    cfg = compose(["task=xsum", f"task.data.path={folder}"])
    task = Task.from_config(cfg.task)
    assert task.splits()["train"] == XSUM[:6]
    assert task.report.to_dict()["train"] == {
        "read": 12,
        "used": 6,
        "dropped": {"empty document": 1, "missing summary": 1, "empty summary": 1, "not_utf8": 1, "malformed": 2},
        "truncated": {},
    }


def test_non_utf8_text_in_csv_and_json_is_dropped(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"document,summary\nok,fine\ncaf\xe9,bad\n")
    records, dropped = read_records(tmp_path / "a.csv")
    assert records == [{"document": "ok", "summary": "fine"}] and dropped == {"not_utf8": 1}
    (tmp_path / "b.json").write_bytes(b'[{"document": "ok"}, {"document": "caf\xe9"}]')
    records, dropped = read_records(tmp_path / "b.json")
    assert records == [{"document": "ok"}] and dropped == {"not_utf8": 1}


def test_a_dataset_with_the_wrong_fields_fails_naming_the_fields_it_has(tmp_path):
    folder = tmp_path / "xsum"
    write_jsonl(folder / "train.jsonl", [{"text": "a", "headline": "b"}] * 3)
    write_jsonl(folder / "validation.jsonl", XSUM[:2])
    cfg = compose(["task=xsum", f"task.data.path={folder}"])
    with pytest.raises(ValueError, match=r"every example of the train split was dropped \(missing document: 3\).*"
                                         r"the first record has fields: headline, text"):
        Task.from_config(cfg.task).splits()


def test_skipping_long_examples_drops_training_ones_but_never_validation_ones(tokenizer, tmp_path):
    task = local_task(tmp_path, "xsum", "task.long_examples=skip", "task.max_target_tokens=16", "task.batch_size=1",
                      "task.truncate_field=null")
    long_summary = [dict(e, summary=e["summary"] * 5) for e in XSUM[:2]]
    train = TokenizedExamples(task.splits()["train"] + long_summary, task, tokenizer, "train")
    validation = TokenizedExamples(long_summary, task, tokenizer, "validation")
    assert len(validation) == 2 and all(len(i.student.target) == 16 for i in validation)
    report = task.report.to_dict()
    assert report["train"]["dropped"] == {"too long target": 10}  # every xsum summary is over 16 tokens here
    assert report["validation"]["truncated"] == {"target": 2}
    assert len(train) == 0


def test_fewer_training_examples_than_a_batch_stops_before_training(tokenizer, tmp_path):
    task = local_task(tmp_path, "xsum", "task.long_examples=skip", "task.max_target_tokens=4")
    dm = DistillationDataModule(task, tokenizer)
    with pytest.raises(ValueError, match=r"(?s)0 training examples remain.*nothing to train on.*too long target: 8"):
        dm.setup()


def test_a_long_article_is_cut_inside_the_article_and_the_instruction_survives(tokenizer, tmp_path):
    task = local_task(tmp_path, "xsum", "task.max_prompt_tokens=60")
    example = dict(XSUM[0], document=" ".join(f"word{i}" for i in range(200)))
    (ids, cut), = PromptEncoder(task, tokenizer).encode([example])
    text = tokenizer.decode(ids)
    assert cut == "prompt field" and len(ids) <= 60
    assert text.startswith("Summarize the following article in one sentence.\n\nArticle: word0 word1")
    assert text.endswith("\n\nSummary:")


# -- prompts per tokenizer: special tokens and chat templates ------------------------------------------------------
def _tokenizer_with_template(tokenizer, single: str):
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in ("<s>", "</s>")]
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=single, special_tokens=specials)
    return tok


@pytest.mark.parametrize("single,where", [("<s> $A", "prefix"), ("$A </s>", "suffix")])
def test_prompts_carry_the_tokenizers_own_special_tokens_even_when_truncated(tokenizer, single, where, tmp_path):
    tok = _tokenizer_with_template(tokenizer, single)
    prefix, suffix = special_affixes(tok)
    assert (prefix, suffix) == (([tok.bos_token_id], []) if where == "prefix" else ([], [tok.eos_token_id]))
    task = local_task(tmp_path, "gsm8k", "task.max_prompt_tokens=10")
    (ids, cut), = PromptEncoder(task, tok).encode([GSM8K[0]])
    body = tok(task.prompt(GSM8K[0]), add_special_tokens=False)["input_ids"]
    assert cut == "prompt" and ids == prefix + body[-9:] + suffix


def test_a_chat_model_sees_the_prompt_through_its_chat_template(tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<s>[{{ m.role }}] {{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %} [assistant]{% endif %}")
    task = local_task(tmp_path, "gsm8k")
    encoder = PromptEncoder(task, tok)
    assert encoder.text(GSM8K[0]) == f"<s>[user] {task.prompt(GSM8K[0])} [assistant]"
    (ids, _), = encoder.encode([GSM8K[0]])
    assert ids[0] == tok.bos_token_id  # the template's <s> is the special token, not its characters
    never = local_task(tmp_path, "gsm8k", "task.chat_template=never")
    assert PromptEncoder(never, tok).text(GSM8K[0]) == never.prompt(GSM8K[0])


# -- few-shot -------------------------------------------------------------------------------------------------------
def test_few_shot_exemplars_come_from_train_precede_every_prompt_and_leave_the_training_set(tmp_path):
    task = local_task(tmp_path, "gsm8k", "task.few_shot=2")
    splits = task.splits()
    assert len(splits["train"]) == 6
    shots = [e for e in GSM8K[:8] if e not in splits["train"]]
    prefix = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in shots)
    example = splits["validation"][0]
    assert task.prompt(example) == prefix + f"Question: {example['question']}\nAnswer:"
    again = local_task(tmp_path, "gsm8k", "task.few_shot=2")
    again.splits()
    assert again.prompt(example) == task.prompt(example)


# -- hub ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_a_hub_task_without_network_or_local_files_fails_at_start_up_naming_local_files(name, tmp_path):
    from kdlab.run.train import validate
    from kdlab.run.validate import ConfigError

    cfg = compose([f"task={name}", "teacher=tiny", "student=tiny"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"could not load split .* of hub dataset .*task\.data\.path="):
        validate(cfg)


def test_train_py_reports_a_missing_dataset_in_one_message_without_a_stack_trace(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run(
        [sys.executable, "train.py", "task=xsum", "teacher=tiny", "student=tiny", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "task.data.path=" in out.stderr
    assert out.stderr.strip().startswith("error: invalid config:")


# -- the real files in ../shared/data --------------------------------------------------------------------------------
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present beside the repo")


@needs_shared
def test_real_gsm8k_files_load_whole_and_their_answers_score_perfectly():
    cfg = compose(["task=gsm8k", f"task.data.path={SHARED_DATA / 'gsm8k'}"])
    task = Task.from_config(cfg.task)
    splits = task.splits()
    assert (len(splits["train"]), len(splits["validation"])) == (7473, 1319)
    assert task.report.to_dict()["train"]["dropped"] == {}
    references = [task.reference(e) for e in splits["validation"]]
    assert task.score(references, references) == {"accuracy": 1.0}
    wrong = [r.replace("####", "#### 1") for r in references]
    assert task.score(wrong, references)["accuracy"] < 0.05


@needs_shared
def test_real_dialogsum_files_load_with_the_original_split_and_field_names():
    cfg = compose(["task=dialogsum", f"task.data.path={SHARED_DATA / 'dialogsum'}", "task.data.splits.train=dev",
                   "task.data.splits.validation=test"])
    task = Task.from_config(cfg.task)
    splits = task.splits()
    assert (len(splits["train"]), len(splits["validation"])) == (500, 500)
    first_test = json.loads((SHARED_DATA / "dialogsum" / "test.jsonl").open().readline())
    assert task.reference(splits["validation"][0]) == first_test["summary1"]
    assert task.prompt(splits["validation"][0]).startswith("Summarize the following dialogue.\n\n#Person1#:")


# -- end to end: every task through run() on tiny models --------------------------------------------------------------
HEADLINE = {"xsum": "rouge2", "wmt14_en_de": "bleu", "gsm8k": "accuracy", "instruction": "rougeL",
            "dialogsum": "rougeLsum"}


def _library_scores(name: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """The task's metric computed by calling the scoring library directly (not through kdlab's evaluate module)."""
    if name == "wmt14_en_de":
        import sacrebleu

        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
                "chrf": sacrebleu.corpus_chrf(predictions, [references]).score}
    if name == "gsm8k":
        from kdlab.data.answers import accuracy

        return {"accuracy": accuracy(predictions, references)}
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {key: sum(s[key].fmeasure for s in scores) / len(scores) for key in ("rouge1", "rouge2", "rougeL")}


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_each_task_trains_and_scores_end_to_end_on_local_files(name, tmp_path):
    from kdlab.run.train import run
    from tests.conftest import TINY_RUN

    folder = task_files(tmp_path, name)
    overrides = [o for o in TINY_RUN if not o.startswith(("task.train_size", "task.val_size"))]
    beams = ["task.generation.num_beams=2"] if name == "dialogsum" else []  # beam search is allowed in validation
    cfg = compose([*overrides, f"task={name}", f"task.data.path={folder}", "task.val_size=8",
                   "task.max_prompt_tokens=96", *beams], output_dir=tmp_path / "run")
    value = run(cfg)
    results = json.loads((tmp_path / "run" / RESULTS).read_text())
    assert results["task"] == name and results["metric"] == HEADLINE[name]
    assert value == results["metrics"][HEADLINE[name]] and results["steps"] == 3
    assert results["data"]["train"]["used"] > 0 and results["teacher"] is not None
    for role in ("teacher", "student_before", "student_after"):
        rows = [json.loads(line) for line in (tmp_path / "run" / "generations" / f"{role}.jsonl").open()]
        expected = _library_scores(name, [r["prediction"] for r in rows], [r["reference"] for r in rows])
        for key, number in expected.items():
            assert results[role][key] == pytest.approx(number, abs=1e-9), (role, key)


@pytest.mark.parametrize("path", ["translation.en", "translation[en]"])
def test_a_field_is_read_and_replaced_by_the_same_path_rule(path):
    from kdlab.data.tasks import lookup, with_field

    example = WMT[0]
    changed = with_field(example, path, "short")
    assert lookup(changed, path) == "short" and changed["translation"]["de"] == example["translation"]["de"]
    assert lookup(example, path) == "House number 0 is small."  # the original is untouched

"""Teacher and student with different tokenizers: per-tokenizer data, samples carried through text, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from kdlab.data.datamodule import DistillationDataModule
from kdlab.data.tasks import Task
from kdlab.models.loading import load_tokenizer, same_vocabulary
from kdlab.run.compose import task_node
from kdlab.run.rundir import RESULTS
from kdlab.sampling.retokenize import retokenize
from tests.conftest import REPO, TINY_RUN, compose

UNIGRAM = REPO / "src/kdlab/assets/arith/unigram_tokenizer"
SMALL = {"name": "arith", "train_size": 40, "val_size": 12, "eval_examples": 10, "batch_size": 4}


@pytest.fixture(scope="module")
def unigram():
    return load_tokenizer({"tokenizer": str(UNIGRAM)})


def test_the_shipped_cross_tokenizer_differs_in_kind_and_vocabulary(tokenizer, unigram):
    assert not same_vocabulary(tokenizer, unigram) and len(unigram) != len(tokenizer)
    kinds = {json.loads(t.backend_tokenizer.to_str())["model"]["type"] for t in (tokenizer, unigram)}
    assert kinds == {"BPE", "Unigram"}


def test_each_example_is_tokenized_for_both_and_both_sides_hold_the_same_text(tokenizer, unigram):
    task = Task.from_config(task_node(**SMALL))
    dm = DistillationDataModule(task, tokenizer, teacher_tokenizer=unigram)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    for row in range(len(batch)):
        texts = []
        for side, tok in ((batch.student, tokenizer), (batch.teacher, unigram)):
            prompt = side.prompt_ids[row][side.prompt_mask[row]]
            target = side.target_ids[row][side.target_mask[row]]
            assert target[-1] == tok.eos_token_id
            texts.append(tok.decode(prompt) + tok.decode(target[:-1]))
        assert texts[0] == texts[1]
    assert batch.teacher.prompt_ids.max() < len(unigram)


def test_a_shared_tokenizer_is_tokenized_once(tokenizer):
    dm = DistillationDataModule(Task.from_config(task_node(**SMALL)), tokenizer)
    dm.setup()
    assert next(iter(dm.train_dataloader())).teacher is None


def test_retokenized_samples_hold_the_same_text_and_keep_eos_only_where_the_sample_stopped(tokenizer, unigram):
    texts = [" 3 + 4 = 7\n#### 7", " 12 * 3 = 36", ""]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows[0] = rows[0] + [tokenizer.eos_token_id, tokenizer.pad_token_id]  # stopped, then padding
    rows[2] = [tokenizer.eos_token_id]  # stopped at once: empty text
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[i < len(r) for i in range(width)] for r in rows])
    mask[0, -1] = False  # the padding after EOS is not response
    new_ids, new_mask = retokenize(ids, mask, tokenizer, unigram)
    for row, text in enumerate(texts):
        kept = new_ids[row][new_mask[row]].tolist()
        stopped = row != 1
        assert (kept[-1] == unigram.eos_token_id) == stopped
        assert unigram.decode(kept[:-1] if stopped else kept) == text
    back_ids, back_mask = retokenize(new_ids, new_mask, unigram, tokenizer)
    assert back_ids[0][back_mask[0]].tolist() == rows[0][:-1]  # a round trip gives the original tokens back


def test_a_same_vocabulary_loss_with_different_tokenizers_names_the_cross_tokenizer_losses(tmp_path):
    from kdlab.run.train import validate
    from kdlab.run.validate import ConfigError

    cfg = compose([*TINY_RUN, "loss=jsd", f"teacher.tokenizer={UNIGRAM}"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"loss=jsd compares teacher and student token by token.*loss=ot.*loss=uld"):
        validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("loss,policy", [("ot", "onpolicy"), ("ot", "mixed"), ("ot", "seqkd"), ("uld", "supervised"),
                                         ("uld", "onpolicy")])
def test_cross_tokenizer_runs_end_to_end(tmp_path, loss, policy):
    from kdlab.run.train import run

    cfg = compose([*TINY_RUN, f"loss={loss}", f"policy={policy}", f"teacher.tokenizer={UNIGRAM}"], output_dir=tmp_path)
    run(cfg)
    results = json.loads((tmp_path / RESULTS).read_text())
    assert results["steps"] == 3 and results["loss"] == loss and results["teacher"] is not None
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    terms = ["train/had", "train/sl", "train/sd"] if loss == "ot" else ["train/uld"]
    assert all(term in header for term in terms)
    assert ("train/ce" in header) == (policy != "onpolicy")  # no CE on the student's own samples
    # the teacher generated in its own tokens and was scored on its own decoded text
    rows = [json.loads(line) for line in (tmp_path / "generations" / "teacher.jsonl").open()]
    assert len(rows) == 8


@pytest.mark.slow
def test_the_shipped_cross_tokenizer_teacher_distils_into_the_shipped_student(tmp_path):
    from kdlab.run.train import run

    overrides = ["loss=ot", "teacher=arith_unigram_teacher", "trainer.max_steps=2", "task.eval_examples=16",
                 "task.eval_batch_size=16", "task.batch_size=4", "task.train_size=64", "eval.before=false"]
    cfg = compose(overrides, output_dir=tmp_path)
    assert cfg.student.name == "arith-student" and not same_vocabulary(
        load_tokenizer(cfg.student), load_tokenizer(cfg.teacher))
    run(cfg)
    results = json.loads((tmp_path / RESULTS).read_text())
    assert results["teacher"]["accuracy"] > 0.1  # a trained teacher, scored in its own tokens (0.43 on 200 problems)
    assert results["steps"] == 2


def bos_prepending(path):
    """A copy of a shipped tokenizer that prepends its BOS when it encodes with special tokens (as Llama-3's does
    and Qwen-3's does not: huggingface/trl#4392)."""
    from tokenizers import processors

    tok = load_tokenizer({"tokenizer": str(path)})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("1 + 2").input_ids[0] == tok.bos_token_id  # it does prepend
    return tok


def test_a_bos_that_one_tokenizer_prepends_never_enters_either_response(tokenizer):
    """trl#4392: GOLD's alignment compared decoded buffers, and a BOS on one side only kept them misaligned for the
    whole sequence. kdlab aligns no tokens: responses cross through their text, encoded without special tokens, and
    the dataset's targets are encoded the same way, so a BOS can only sit in a prompt."""
    teacher_tokenizer = bos_prepending(UNIGRAM)
    dm = DistillationDataModule(Task.from_config(task_node(**SMALL)), tokenizer, teacher_tokenizer=teacher_tokenizer)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    for side, tok in ((batch.student, tokenizer), (batch.teacher, teacher_tokenizer)):
        targets = side.target_ids[side.target_mask]
        assert tok.bos_token_id not in targets.tolist()
    ids = batch.student.target_ids
    new_ids, new_mask = retokenize(ids, batch.student.target_mask, tokenizer, teacher_tokenizer)
    assert teacher_tokenizer.bos_token_id not in new_ids[new_mask].tolist()
    assert torch.equal(new_ids[new_mask], batch.teacher.target_ids[batch.teacher.target_mask])  # the same tokens


def test_characters_split_across_byte_tokens_cross_whole(tokenizer):
    """trl#4393: characters of several UTF-8 bytes are split across byte-level tokens, and decoding piece by piece
    never reconciles them. kdlab decodes each response whole, so the other side encodes the very text."""
    other = bos_prepending(REPO / "src/kdlab/assets/arith/tokenizer")
    texts = ["café 3€ = 😀", " 12 * 3 = 36 ✓"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    assert any(tokenizer.decode([t]) == "\ufffd" for t in rows[0])  # a token holding part of a character
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[i < len(r) for i in range(width)] for r in rows])
    new_ids, new_mask = retokenize(ids, mask, tokenizer, other)
    for row, text in enumerate(texts):
        kept = new_ids[row][new_mask[row]].tolist()
        assert kept[-1] == other.eos_token_id and other.bos_token_id not in kept
        assert other.decode(kept[:-1]) == text

"""The shipped ROUGE and BLEU metrics agree with rouge-score and sacreBLEU called directly, and with hand counts."""

import ast
import sys
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from kdlab.evaluation.metrics import METRICS_DIR, available_metrics, load_metric

PAIRS = [
    ("The council closed the old bridge. Repairs start on Monday!", "The old bridge was closed by the council."),
    ("Two men were arrested after a fight in Leeds.", "Police arrested two men following a fight in Leeds city."),
    ("Prices rose 3% in May.\nAnalysts expect more.", "Inflation hit 3% in May. Analysts expect further rises."),
    ("Der Hund läuft schnell über die Straße.", "Der Hund rennt schnell über die Straße."),
    ("", "A reference with no prediction at all."),
]
PREDICTIONS = [p for p, _ in PAIRS]
REFERENCES = [r for _, r in PAIRS]


@pytest.fixture(scope="module")
def rouge():
    return load_metric("rouge")


@pytest.fixture(scope="module")
def bleu():
    return load_metric("bleu")


@pytest.fixture(scope="module")
def split_sentences(rouge):
    """The splitter of the script as evaluate imported it from its cache."""
    return sys.modules[type(rouge).__module__].split_sentences


def _imported_top_level_modules(path):
    tree = ast.parse(path.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "." for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize("name,allowed", [
    ("rouge", {"logging", "re", "datasets", "evaluate", "rouge_score"}),
    ("bleu", {"datasets", "evaluate", "sacrebleu"}),
])
def test_both_are_shipped_and_import_nothing_from_kdlab(name, allowed):
    # evaluate copies the script alone into its cache, where `kdlab` may not be importable
    assert {"rouge", "bleu", "gsm8k_accuracy"} <= set(available_metrics())
    assert _imported_top_level_modules(METRICS_DIR / name / f"{name}.py") <= allowed


def test_bleu_script_imports_the_real_sacrebleu_package(bleu):
    # a script named sacrebleu.py would import itself; the loaded script must see the installed package
    script = sys.modules[type(bleu).__module__]
    assert Path(script.__file__).name == "bleu.py"
    assert script.sacrebleu is sacrebleu and hasattr(script.sacrebleu, "corpus_bleu")


def test_rouge_equals_rouge_score_called_directly(rouge, split_sentences):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per_example = [scorer.score("\n".join(split_sentences(r)), "\n".join(split_sentences(p))) for p, r in PAIRS]
    result = rouge.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert set(result) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result[key] == pytest.approx(sum(s[key].fmeasure for s in per_example) / len(PAIRS), abs=1e-12)
    raw = [scorer.score(r, p) for p, r in PAIRS]  # sentence splitting changes whitespace only: 1/2/L unaffected
    assert result["rouge1"] == pytest.approx(sum(s["rouge1"].fmeasure for s in raw) / len(PAIRS), abs=1e-12)


def test_rouge1_by_hand(rouge):
    # prediction "the cat ran", reference "the cat sat down": 2 shared unigrams; P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    result = rouge.compute(predictions=["the cat ran"], references=["the cat sat down"])
    assert result["rouge1"] == pytest.approx(4 / 7, abs=1e-12)
    assert result["rouge2"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3), abs=1e-12)  # "the cat"


def test_use_stemmer_by_hand_and_against_rouge_score(rouge):
    # stemmed: "the cat are run" vs "the cat run": 3 shared, P = 3/4, R = 3/3, F = 6/7;
    # unstemmed: only "the" is shared, P = 1/4, R = 1/3, F = 2/7
    predictions, references = ["the cats are running"], ["the cat runs"]
    assert rouge.compute(predictions=predictions, references=references)["rouge1"] == pytest.approx(6 / 7, abs=1e-12)
    plain = rouge.compute(predictions=predictions, references=references, use_stemmer=False)
    assert plain["rouge1"] == pytest.approx(2 / 7, abs=1e-12)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    per_example = [scorer.score(r, p) for p, r in PAIRS]
    result = rouge.compute(predictions=PREDICTIONS, references=REFERENCES, use_stemmer=False)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(sum(s[key].fmeasure for s in per_example) / len(PAIRS), abs=1e-12)


def test_rouge_lsum_uses_sentences_and_differs_from_rouge_l(rouge, split_sentences):
    prediction = "Bob went home. Alice stayed at work."
    reference = "Alice stayed at work. Bob went home."
    result = rouge.compute(predictions=[prediction], references=[reference])
    # rougeL: the LCS over 7 tokens each is "alice stayed at work", 4 tokens, so P = R = F = 4/7;
    # rougeLsum: each reference sentence is matched against the union over prediction sentences, so F = 1
    assert result["rougeL"] == pytest.approx(4 / 7, abs=1e-12)
    assert result["rougeLsum"] == pytest.approx(1.0, abs=1e-12)
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    joined = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
    assert result["rougeLsum"] == pytest.approx(joined["rougeLsum"].fmeasure, abs=1e-12)
    # without the newlines rouge-score sees one sentence and rougeLsum collapses to rougeL: the splitter matters
    assert scorer.score(reference, prediction)["rougeLsum"].fmeasure == pytest.approx(4 / 7, abs=1e-12)


def test_sentence_splitter_by_hand(split_sentences):
    assert split_sentences("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    assert split_sentences("Pi is 3.14 today.\n\nNew line") == ["Pi is 3.14 today.", "New line"]
    assert split_sentences("  ") == []
    assert split_sentences("") == []
    assert split_sentences("Wait?! Yes... ok") == ["Wait?!", "Yes...", "ok"]
    assert split_sentences("a.b and 1.5 stay whole.") == ["a.b and 1.5 stay whole."]  # no whitespace after the dot
    assert split_sentences("Dr. Who left") == ["Dr.", "Who left"]  # the fixed rule knows no abbreviations
    assert split_sentences("line one\r\nline two\n") == ["line one", "line two"]
    assert split_sentences("Grüße aus Köln. Schön!") == ["Grüße aus Köln.", "Schön!"]


def test_bleu_and_chrf_equal_sacrebleu_called_directly(bleu):
    result = bleu.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    # tokenize="none" splits on whitespace only, so "bridge." != "bridge": the kwarg really reaches sacreBLEU
    untokenized = bleu.compute(predictions=PREDICTIONS, references=REFERENCES, tokenize="none")
    direct = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES], tokenize="none").score
    assert untokenized["bleu"] == pytest.approx(direct, abs=1e-9)
    assert abs(untokenized["bleu"] - result["bleu"]) > 1.0
    assert set(result) == set(untokenized) == {"bleu", "chrf"}


def test_identical_texts_score_the_maximum(rouge, bleu):
    texts = [r for r in REFERENCES if r]
    assert all(v == pytest.approx(1.0) for v in rouge.compute(predictions=texts, references=texts).values())
    assert all(v == pytest.approx(100.0) for v in bleu.compute(predictions=texts, references=texts).values())


@pytest.mark.parametrize("name", ["rouge", "bleu"])
def test_empty_input_scores_zero_and_mismatched_lengths_raise(name, rouge, bleu):
    metric = {"rouge": rouge, "bleu": bleu}[name]
    assert set(metric.compute(predictions=[], references=[]).values()) == {0.0}
    with pytest.raises(ValueError):
        metric.compute(predictions=["a", "b"], references=["a"])


def test_metric_folders_hold_one_script_each():
    for name in ("rouge", "bleu"):
        assert sorted(p.name for p in (METRICS_DIR / name).glob("*.py")) == [f"{name}.py"]
    assert Path(METRICS_DIR / "bleu").name != "sacrebleu"

"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures, computed with Google's `rouge-score` package.

This is an `evaluate` metric module: `evaluate.load` copies this file alone into its modules cache, so it imports
nothing from kdlab. Scores are the plain mean of each example's F-measure on rouge-score's 0-1 scale. (The hub's
`rouge` metric reports the "mid" of a bootstrap by default, which differs from this mean in the third decimal.)
ROUGE-Lsum needs one sentence per line; sentences are split with a fixed rule, with no nltk data to download.
"""

import logging
import re

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """
ROUGE (Lin, 2004) F-measures between generated and reference texts: unigram (rouge1) and bigram (rouge2) overlap,
longest common subsequence over the whole text (rougeL) and summary-level LCS over sentences (rougeLsum). English
tokenization and Porter stemming as in rouge-score (`use_stemmer=True` by default). For rougeLsum, each text is split
into sentences after `.`, `!` or `?` followed by whitespace, and at newlines; the sentences are joined by newlines, as
rouge-score expects. Each score is the mean over examples of the per-example F-measure, in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts.
    references (`list` of `str`): one reference text per prediction.
    use_stemmer (`bool`, default True): Porter-stem tokens before matching.
    per_example (`bool`): also return `per_example`, each type's F-measure per prediction ({"rouge1": [...], ...}).
Returns:
    rouge1, rouge2, rougeL, rougeLsum (`float`): mean F-measures in [0, 1] (0.0 each for no examples).
Examples:
    >>> metric = evaluate.load("path/to/rouge")
    >>> metric.compute(predictions=["the cat sat"], references=["the cat sat"])["rouge1"]
    1.0
"""

_CITATION = """
@inproceedings{lin2004rouge,
  title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  pages={74--81},
  year={2004}
}
"""

logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." on every call

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text):
    """Sentences of `text`: split after `.`, `!` or `?` followed by whitespace, and at newlines; blanks dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Value("string"),
            }),
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, use_stemmer=True, per_example=False):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return {key: 0.0 for key in ROUGE_TYPES} | ({"per_example": {k: [] for k in ROUGE_TYPES}} if per_example
                                                        else {})
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        each = {key: [] for key in ROUGE_TYPES}
        for prediction, reference in zip(predictions, references):
            # rougeLsum reads sentences from newlines; the other types ignore them
            scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
            for key in ROUGE_TYPES:
                each[key].append(scores[key].fmeasure)
        result = {key: sum(values) / len(predictions) for key, values in each.items()}
        if per_example:  # the corpus score is the mean of these
            result["per_example"] = each
        return result

"""Corpus BLEU and chrF with sacreBLEU, the scores machine-translation papers report (WMT14 en-de in GKD).

This is an `evaluate` metric module: `evaluate.load` copies this file alone into its modules cache, so it imports
nothing from kdlab. The folder is named `bleu`, not `sacrebleu`, so that this script never shadows the package.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """
Corpus-level BLEU (Papineni et al., 2002) and chrF (Popović, 2015) as computed by sacreBLEU (Post, 2018), with one
reference per prediction and sacreBLEU's defaults (13a tokenization, exponential smoothing off for corpus BLEU,
chrF with character 6-grams and beta 2). Scores are on sacreBLEU's 0-100 scale.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated translations.
    references (`list` of `str`): one reference translation per prediction.
    tokenize (`str`, default "13a"): sacreBLEU tokenizer for BLEU ("13a", "intl", "zh", "ja-mecab", "none", ...).
    per_example (`bool`): also return `per_example`, sentence-level BLEU and chrF per prediction (the corpus scores
        are not their means: corpus BLEU pools n-gram counts over all sentences).
Returns:
    bleu (`float`): corpus BLEU in [0, 100]; chrf (`float`): corpus chrF in [0, 100] (0.0 each for no examples).
Examples:
    >>> metric = evaluate.load("path/to/bleu")
    >>> metric.compute(predictions=["Das Haus ist klein."], references=["Das Haus ist klein."])["bleu"]
    100.00000000000004
"""

_CITATION = """
@inproceedings{post2018call,
  title={A Call for Clarity in Reporting {BLEU} Scores},
  author={Post, Matt},
  booktitle={Proceedings of the Third Conference on Machine Translation},
  pages={186--191},
  year={2018}
}
@inproceedings{papineni2002bleu,
  title={{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL},
  pages={311--318},
  year={2002}
}
@inproceedings{popovic2015chrf,
  title={chr{F}: character n-gram {F}-score for automatic {MT} evaluation},
  author={Popovi{\'c}, Maja},
  booktitle={Proceedings of the Tenth Workshop on Statistical Machine Translation},
  pages={392--395},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Value("string"),
            }),
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, tokenize="13a", per_example=False):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        result = {"bleu": 0.0, "chrf": 0.0}
        if predictions:
            bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize)
            chrf = sacrebleu.corpus_chrf(list(predictions), [list(references)])
            result = {"bleu": float(bleu.score), "chrf": float(chrf.score)}
        if per_example:
            pairs = list(zip(predictions, references))
            result["per_example"] = {
                "bleu": [float(sacrebleu.sentence_bleu(p, [r], tokenize=tokenize).score) for p, r in pairs],
                "chrf": [float(sacrebleu.sentence_chrf(p, [r]).score) for p, r in pairs]}
        return result

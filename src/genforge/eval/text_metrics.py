"""Reference-based text metrics: BLEU and chrF (sacrebleu), ROUGE-1/2/L F1 (rouge-score) and
exact match, per item and over a whole set.

The libraries' own defaults are kept, so the figures compare with published ones: sacrebleu's 13a
tokenization and exponential smoothing for sentence BLEU, chrF with character 6-grams and beta 2,
ROUGE on lower-cased alphanumeric tokens without stemming. BLEU and chrF are 0-100, the others 0-1.
The corpus BLEU/chrF pool n-gram counts over every item (not a mean of sentence scores); ROUGE and
exact match are means over the items.
"""

from __future__ import annotations

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ITEM_METRICS = ("bleu", "chrf", *ROUGE_TYPES, "exact_match")


def normalize_whitespace(text: str) -> str:
    """Runs of whitespace as one space, none at the ends: what exact match compares."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_whitespace(prediction) == normalize_whitespace(reference))


def item_scores(prediction: str, reference: str, scorer: rouge_scorer.RougeScorer | None = None) -> dict[str, float]:
    """Every metric of one prediction against its reference."""
    scorer = scorer or rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    rouge = scorer.score(reference, prediction)
    return {"bleu": sacrebleu.sentence_bleu(prediction, [reference]).score,
            "chrf": sacrebleu.sentence_chrf(prediction, [reference]).score,
            **{name: rouge[name].fmeasure for name in ROUGE_TYPES},
            "exact_match": exact_match(prediction, reference)}


def score_texts(predictions: list[str], references: list[str]) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-item scores and the set's: corpus BLEU and chrF, mean ROUGE F1 and exact match."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no items to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    items = [item_scores(p, r, scorer) for p, r in zip(predictions, references)]
    corpus = {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
              "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
              **{k: sum(s[k] for s in items) / len(items) for k in (*ROUGE_TYPES, "exact_match")}}
    return items, corpus

"""Leave-one-source-out study of the injection guard: the honest proxy for "a set by a new author".

Each source of the train split (v1, more, fresh, fresh2, wide, tech: written at different times, by different
hands or in different styles) is held out in turn: the detector is fitted on all the other sources, and
its threshold is chosen on those sources only (`jobs.guard.cv_threshold`), then the held-out source is
scored. Prints recall / false-positive rate per held-out source and pooled, for the rules alone, the
detector alone and both, and then each rule's hits on attacks and on benign rows across all sources
(a rule earns its place by catching attacks the detector misses, without benign hits).

    .venv/bin/python benchmarks/guard_loso.py [--cache /tmp/guard_loso_features.pkl]

The embeddings take ~40 s on two cores; `--cache` keeps them (keyed by the rows' hash) between runs.
"""

from __future__ import annotations

import argparse
import pickle
from collections import Counter
from pathlib import Path

import numpy as np

from genforge.jobs.guard import SEED, TARGET_TRAIN_FPR, _Features, cv_threshold
from genforge.jobs.guard_data import injection_rows
from genforge.serve.injection import RULES, rows_hash, rule_hits


def features(rows: list[dict], cache: Path | None) -> _Features:
    key = rows_hash(rows)
    if cache is not None and cache.is_file():
        cached = pickle.loads(cache.read_bytes())
        if cached[0] == key:
            return cached[1]
    from genforge.models.embeddings import Embedder

    feats = _Features(rows, Embedder())
    if cache is not None:
        cache.write_bytes(pickle.dumps((key, feats)))
    return feats


def _rate(flags: np.ndarray, labels: np.ndarray) -> str:
    return f"{flags[labels == 1].mean():6.1%} / {flags[labels == 0].mean():5.1%}"


def loso(rows: list[dict], feats: _Features, by: str = "template", seed: int = SEED) -> dict[str, np.ndarray]:
    """Held-out score, threshold and rule flag of every row, each from a fit that never saw its source."""
    sources = np.array([r["source"] for r in rows])
    groups = np.array([r[by] for r in rows])
    rules = np.array([bool(rule_hits(r["text"])) for r in rows])
    score, thr = np.zeros(len(rows)), np.zeros(len(rows))
    for src in sorted(set(sources)):
        held, fit_idx = np.flatnonzero(sources == src), np.flatnonzero(sources != src)
        score[held] = feats.row_scores(held, feats.fit(fit_idx, seed))
        # as train_injection_detector does: the threshold counts the prompts, not the tech rows
        thr[held] = cv_threshold(feats, fit_idx, groups[fit_idx], seed, counted=sources[fit_idx] != "tech")
    return {"source": sources, "score": score, "threshold": thr, "rules": rules, "label": feats.label}


def print_table(res: dict[str, np.ndarray]) -> None:
    print(f"LOSO, detector threshold from the other sources' cross-validation at {TARGET_TRAIN_FPR:.0%} FPR")
    print("| held-out source | n | threshold | rules: recall / FPR | detector | rules + detector |")
    print("|---|---|---|---|---|---|")
    det = res["score"] >= res["threshold"]
    for src in [*sorted(set(res["source"])), "pooled"]:
        m = np.ones(len(det), bool) if src == "pooled" else res["source"] == src
        y = res["label"][m]
        thr = "-" if src == "pooled" else f"{res['threshold'][m][0]:.3f}"
        print(f"| {src} | {m.sum()} | {thr} | {_rate(res['rules'][m], y)} | {_rate(det[m], y)} | "
              f"{_rate(det[m] | res['rules'][m], y)} |")


def print_rules(rows: list[dict], res: dict[str, np.ndarray]) -> None:
    det = res["score"] >= res["threshold"]
    hits: Counter = Counter()
    for r, d in zip(rows, det):
        for name in rule_hits(r["text"]):
                hits[name, "benign" if r["label"] == 0 else ("attack, detector caught" if d else "attack, only rule")] += 1
    print("\n| rule | attacks only it (with rules) catches | attacks also caught by detector | benign hits |")
    print("|---|---|---|---|")
    for name in RULES:
        print(f"| {name} | {hits[name, 'attack, only rule']} | {hits[name, 'attack, detector caught']} | "
              f"{hits[name, 'benign']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="pickle of the embeddings, reused when rows match")
    ap.add_argument("--groups", choices=["template", "source"], default="template",
                    help="how the threshold's inner cross-validation groups the training sources' rows")
    args = ap.parse_args()
    rows = [r for r in injection_rows(SEED) if r["split"] == "train"]
    res = loso(rows, features(rows, args.cache), args.groups)
    print(f"inner folds grouped by {args.groups}")
    print_table(res)
    print_rules(rows, res)


if __name__ == "__main__":
    main()

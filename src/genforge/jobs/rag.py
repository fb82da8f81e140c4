"""`genforge rag ingest|query|eval`: build a document index, search it, and measure its retrieval.

`ingest` lists the sources, loads the embedder and hands both to data/ingest.py's `ingest_sources`
(the core the server's upload route shares): unchanged sources are skipped by their digest, the
rest is chunked, embedded and written in one transaction, and a file that cannot be read is
reported and skipped. This module adds the progress bar and remembers where the embedder is.

`query` and `evaluate` search with data/retriever.py's `Retriever`, the one the server uses.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from genforge.common.errors import DataError, NotFoundError
from genforge.common.progress import console, progress_bar
from genforge.common.store import Store, open_store
from genforge.data.documents import MAX_FILE_BYTES, hf_token_counter, list_sources
from genforge.data.ingest import ingest_sources
from genforge.data.jsonl import read_records
from genforge.data.retrieval import (
    MODES,
    check_mode,
)
from genforge.data.retriever import Retriever, is_relevant, source_texts
from genforge.models.embeddings import Embedder, load_cross_encoder


def ingest(paths: list[str], index: str, store_spec: str, embedder_path: str | None = None,
           chunk_tokens: int = 200, overlap: int = 40, *, max_file_bytes: int = MAX_FILE_BYTES,
           field: str = "text", embedder: Embedder | None = None) -> dict:
    """Index `paths` (files, folders, builtin:pydoc[/topic]) into `index`; returns the counts."""
    t0 = time.perf_counter()
    sources = list_sources(paths)        # a missing path fails here, before anything is written
    if not sources:
        raise DataError(f"no documents found in {', '.join(paths)} (supported: txt, md, html, pdf, jsonl)")
    embedder = embedder or Embedder(embedder_path)
    folders = [str(Path(p).expanduser().resolve()) for p in paths if Path(p).expanduser().is_dir()]
    store = open_store(store_spec)
    try:
        with progress_bar(transient=True) as bar:
            task = bar.add_task("ingest", total=len(sources), info="")

            def progress(stage: str, source: str, done: int, total: int) -> None:
                if stage == "reading":
                    bar.update(task, completed=done, info=Path(source).name)

            stats = ingest_sources(store, index, sources, embedder, hf_token_counter(embedder.tokenizer),
                                   chunk_tokens=chunk_tokens, overlap=overlap, max_file_bytes=max_file_bytes,
                                   field=field, folders=folders, progress=progress)
        # Queries load the same model without being told where it is.
        store.set_index_meta(index, {"embedder_path": str(embedder.path) if embedder_path else None})
    finally:
        store.close()
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return stats


def _open(index: str, store_spec: str, embedder: Embedder | None) -> tuple[Store, Embedder]:
    store = open_store(store_spec)
    try:
        info = store.index_info(index)
        if info is None:
            raise NotFoundError(f"unknown index {index!r} in {store.url} (known: "
                                f"{', '.join(store.indexes()) or 'none'})", param="index")
        embedder = embedder or Embedder((info.get("meta") or {}).get("embedder_path"))
    except BaseException:
        store.close()
        raise
    return store, embedder


def query(index: str, question: str, store_spec: str, k: int = 5, mode: str | None = None, *,
          embedder: Embedder | None = None, reranker_path: str | None = None) -> list[dict]:
    """The top `k` chunks of `index` for `question`: id, source, position, heading, score, text."""
    if mode is not None:
        check_mode(mode)
    store, embedder = _open(index, store_spec, embedder)
    try:
        reranker = load_cross_encoder(reranker_path) if reranker_path else None
        hits = Retriever(store, embedder, index, reranker=reranker).search(question, k, mode)
    finally:
        store.close()
    return [{"id": c.id, "source": c.source, "position": c.position, "heading": c.metadata.get("heading"),
             "score": round(s, 6), "text": c.text} for c, s in hits]


def evaluate(index: str, questions_path: str, store_spec: str, ks: tuple[int, ...] = (1, 3, 5), *,
             embedder: Embedder | None = None, show: bool = True) -> dict:
    """hit@k, MRR@10 and nDCG@5 of every mode on `questions_path` (JSONL: question + topic or source);
    the best mode by nDCG@5 becomes the index's default. A question's target is its source; a chunk
    of another source counts too when its text appears verbatim in the target (pydoc repeats
    sections: "compound" holds "while", "if" and "else" are one text)."""
    rows = _read_questions(questions_path)
    store, embedder = _open(index, store_spec, embedder)
    try:
        retriever = Retriever(store, embedder, index)
        full = source_texts(retriever.chunks())
        missing = sorted({src for _, src in rows} - full.keys())
        if missing:
            raise DataError(f"{questions_path}: {len(missing)} target sources are not in index {index!r} "
                            f"(e.g. {missing[0]}); ingest them first", param="questions")
        vectors = embedder.embed([q for q, _ in rows])
        depth = max(10, *ks)
        result: dict = {"index": index, "questions": len(rows), "modes": {}}
        for mode in MODES:
            ranks = []
            for (q, target), v in zip(rows, vectors):
                hits = retriever.search(q, depth, mode, vector=v)
                ranks.append(next((r for r, (c, _) in enumerate(hits, 1) if is_relevant(c, target, full)), None))
            result["modes"][mode] = _metrics(ranks, ks)
        best = max(MODES, key=lambda m: (result["modes"][m]["ndcg@5"], result["modes"][m]["mrr"]))
        result["default_mode"] = best
        store.set_index_meta(index, {"default_mode": best, "eval": {"questions": len(rows),
                                                                    "ndcg@5": result["modes"][best]["ndcg@5"]}})
    finally:
        store.close()
    result["table"] = eval_table(result)
    if show:
        console.print(result["table"], highlight=False)
    return result


def _read_questions(path: str) -> list[tuple[str, str]]:
    rows = []
    for n, row in read_records(path, "questions file", param="questions"):
        target = row.get("source") or (f"builtin:pydoc/{row['topic']}" if row.get("topic") else None)
        if not isinstance(row.get("question"), str) or not target:
            raise DataError(f"{path}:{n}: each line needs \"question\" and \"topic\" (a pydoc topic) or "
                            "\"source\" (as the index names it)", param="questions")
        rows.append((row["question"], target))
    if not rows:
        raise DataError(f"questions file {path} is empty", param="questions")
    return rows


def _metrics(ranks: list[int | None], ks: tuple[int, ...]) -> dict:
    n = len(ranks)
    out = {f"hit@{k}": sum(r is not None and r <= k for r in ranks) / n for k in ks}
    out["mrr"] = sum(1 / r for r in ranks if r is not None) / n
    # One target per question: nDCG@5 = 1 / log2(1 + rank of the first relevant chunk), 0 beyond 5.
    out["ndcg@5"] = sum(1 / math.log2(1 + r) for r in ranks if r is not None and r <= 5) / n
    return {k: round(v, 4) for k, v in out.items()}


def eval_table(result: dict) -> str:
    """The per-mode metrics as a markdown table (the CLI prints it; the README shows it)."""
    cols = list(next(iter(result["modes"].values())))
    lines = [f"| mode | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    for mode, m in result["modes"].items():
        mark = " (default)" if mode == result.get("default_mode") else ""
        lines.append(f"| {mode}{mark} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)

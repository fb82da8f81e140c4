"""Answering a suite with retrieval (`genforge eval RUN --suite FILE --rag INDEX`), and how well it retrieved.

Each item's question (its prompt, or its last user turn) is searched in the index with the
Retriever `genforge serve --rag` uses, and the sources go into the prompt exactly as the server
puts them (data/retriever.py `with_sources`): as many of the top k as fit the model's context
beside `max_new_tokens`, the rest dropped, as the server does for a short-context model.

Retrieval is scored where an item names its target, as `genforge rag eval` scores it: the label
`source` (as the index names it) or `topic` (a CPython docs topic: builtin:pydoc/<topic>); a hit is
a chunk of the target or a passage quoted verbatim from it (`is_relevant`). Reported: hit@1, hit@k,
MRR over the top k, and the share of items whose prompt held a relevant source (what the model
could actually read). Faithfulness (supported claims / claims) is the judge's part
(eval/judge_suite.py), over the sources each answer was given.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from genforge.common.errors import ConfigError, DataError, NotFoundError
from genforge.common.progress import progress_bar
from genforge.common.store import Chunk, open_store
from genforge.data.retrieval import check_mode
from genforge.data.retriever import (
    RAG_TEMPLATE,
    Retriever,
    is_relevant,
    source_block,
    source_texts,
    with_sources,
)


@dataclass
class RagSettings:
    index: str
    store: str  # a state folder or postgresql:// URL (the CLI passes genforge serve's default)
    k: int = 4  # as genforge serve's rag.k
    mode: str | None = None  # None: the mode `genforge rag eval` measured best for the index

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 20:
            raise ConfigError(f"--rag-k must be 1-20 (sources in the prompt), got {self.k}", param="rag_k")
        if self.mode is not None:
            check_mode(self.mode)


def question_of(item) -> str:
    """What is searched for an item: its prompt, or the text of its last user turn."""
    if item.messages is None:
        return item.prompt
    users = [m["content"] for m in item.messages if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise DataError(f"{item.where}: --rag searches the last user turn, and this item has none (or it is empty)")
    return users[-1]


def target_of(item) -> str | None:
    """The source whose text answers the item (labels `source` or `topic`), or None."""
    labels = item.labels
    if labels.get("source"):
        return labels["source"]
    return f"builtin:pydoc/{labels['topic']}" if labels.get("topic") else None


class SuiteSources:
    """The top-k chunks of every item, searched once per suite (both runs of a --compare read the
    same sources); `place` then fits them into one model's prompts."""

    def __init__(self, settings: RagSettings, items: list, embedder=None):
        from genforge.models.embeddings import Embedder

        self.settings = settings
        store = open_store(settings.store)
        try:
            info = store.index_info(settings.index)
            if info is None:
                raise NotFoundError(f"--rag {settings.index}: no such index in {store.url} (known: "
                                    f"{', '.join(store.indexes()) or 'none'}; build one with `genforge rag ingest "
                                    f"PATHS --index {settings.index}`)", param="rag")
            embedder = embedder or Embedder((info.get("meta") or {}).get("embedder_path"))
            retriever = Retriever(store, embedder, settings.index)
            self.mode = settings.mode or retriever.default_mode
            questions = [question_of(item) for item in items]
            vectors = embedder.embed(questions) if self.mode != "bm25" else [None] * len(items)
            with progress_bar() as bar:
                task = bar.add_task(f"retrieving from {settings.index}", total=len(items), info=self.mode)
                self.found: list[list[tuple[Chunk, float]]] = []
                for q, v in zip(questions, vectors):
                    self.found.append(retriever.search(q, settings.k, self.mode, vector=v))
                    bar.update(task, advance=1)
            self.texts = source_texts(retriever.chunks())
        finally:
            store.close()
        self.questions = questions
        self.targets = [target_of(item) for item in items]
        unknown = sorted({t for t in self.targets if t is not None} - self.texts.keys())
        if unknown:
            raise DataError(f"--rag {settings.index}: {len(unknown)} target sources named by the suite's labels are "
                            f"not in the index (e.g. {unknown[0]}); ingest them, or drop the `source`/`topic` labels",
                            param="rag")
        # rank of the first relevant chunk among the top k, per item (None: none found, or no target)
        self.ranks = [next((r for r, (c, _) in enumerate(found, 1) if is_relevant(c, t, self.texts)), None)
                      if t is not None else None for found, t in zip(self.found, self.targets)]

    def asked(self, item, i: int, n: int):
        """Item i as the model is asked it with its top n sources (n = 0: the item unchanged)."""
        if n == 0:
            return item
        chunks = [c for c, _ in self.found[i][:n]]
        if item.messages is None:
            blocks = "\n\n".join(source_block(j, c) for j, c in enumerate(chunks, 1))
            return type(item)(item.where, item.reference, prompt=RAG_TEMPLATE.format(
                sources=blocks, question=item.prompt), labels=item.labels)
        last = max(j for j, m in enumerate(item.messages) if m["role"] == "user")
        return type(item)(item.where, item.reference, messages=with_sources(item.messages, last, self.questions[i],
                                                                              chunks), labels=item.labels)

    def place(self, items: list, prompt_length, limit: int, reserve: int) -> tuple[list, list[int]]:
        """(the items as asked, sources in each prompt): the most of the top k whose prompt leaves
        `reserve` tokens of the `limit`-token context free; `prompt_length(item)` counts tokens."""
        asked, placed = [], []
        for i, item in enumerate(items):
            n = len(self.found[i])
            while n > 0 and prompt_length(self.asked(item, i, n)) + reserve > limit:
                n -= 1
            asked.append(self.asked(item, i, n))
            placed.append(n)
        return asked, placed

    def row(self, i: int, placed: int) -> dict:
        """What results.jsonl records of item i's retrieval."""
        sources = [{"id": c.id, "source": c.source, "score": round(float(s), 6), "in_prompt": j < placed,
                    "relevant": None if self.targets[i] is None else is_relevant(c, self.targets[i], self.texts),
                    **({"text": source_block(j + 1, c)} if j < placed else {})}
                   for j, (c, s) in enumerate(self.found[i])]
        return {"target": self.targets[i], "rank": self.ranks[i], "sources_in_prompt": placed, "sources": sources}

    def metrics(self, placed: list[int]) -> dict:
        """hit@1, hit@k, MRR@k over the items with a target; the share whose prompt held a hit."""
        k = self.settings.k
        scored = [(r, n) for r, n, t in zip(self.ranks, placed, self.targets) if t is not None]
        out: dict = {"index": self.settings.index, "mode": self.mode, "k": k, "items_with_target": len(scored),
                     "mean_sources_in_prompt": statistics.fmean(placed) if placed else 0.0,
                     "items_without_sources": sum(n == 0 for n in placed)}
        if scored:
            n = len(scored)
            out.update({"hit@1": sum(r == 1 for r, _ in scored) / n,
                        f"hit@{k}": sum(r is not None for r, _ in scored) / n,
                        "mrr": sum(1 / r for r, _ in scored if r is not None) / n,
                        "hit_in_prompt": sum(r is not None and r <= p for r, p in scored) / n})
        return out


def retrieval_lines(name: str, m: dict) -> list[str]:
    """Report lines for one run's retrieval metrics."""
    k = m["k"]
    head = (f"{name}retrieval from index `{m['index']}` ({m['mode']}, top {k}): {m['mean_sources_in_prompt']:.2f} "
            f"sources per prompt on average ({m['items_without_sources']} prompts had room for none)")
    if not m["items_with_target"]:
        return [head + "; no item names its target (labels `source` or `topic`), so no hit rate."]
    return [head + f"; over {m['items_with_target']} items with a target: hit@1 {m['hit@1']:.3f}, hit@{k} "
            f"{m[f'hit@{k}']:.3f}, MRR@{k} {m['mrr']:.3f}, relevant source in the prompt {m['hit_in_prompt']:.3f}."]


"""Writing documents into one index of a store: sources -> chunks -> vectors -> one transaction.

`ingest_sources` is the core that `genforge rag ingest` (jobs/rag.py) and the server's upload route
(serve/documents.py) share. It reads every source, skips the ones whose bytes (and chunking settings)
are unchanged since the last ingest, chunks and embeds the rest, and writes them in one
`store.write` transaction: the index changes all at once or, when anything raises (a cancelled
upload, a process that dies), not at all. A source that cannot be read (empty, too big, a broken
PDF) is reported in `failed` and skipped; the rest goes on.

This layer loads no model: the caller passes the embedder (anything with `embed(texts)`, `name`,
`version` and `dim`) and the token counter of its tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from genforge.common.errors import DataError
from genforge.common.store import Chunk, IndexWriter, Store
from genforge.data.documents import (
    MAX_FILE_BYTES,
    Source,
    TokenCounter,
    chunk_document,
    embedding_text,
    parse,
)
from genforge.data.retriever import TextEmbedder, embedder_id

# Bumped when chunking changes, so the next ingest re-chunks sources whose bytes did not change.
CHUNKER_VERSION = 1
# Chunks per embedding call: each call is one progress step, and what waits for the writer is bounded.
EMBED_BATCH = 128

# progress(stage, source, done, total): stage "reading" counts sources (done of all sources),
# "embedding" counts chunks (embedded of those read so far), "writing" counts sources handed to the
# writer (of those read so far). Raising from it abandons the ingest: nothing is written.
Progress = Callable[[str, str, int, int], None]


class IndexEmbedder(TextEmbedder, Protocol):
    dim: int


def ingest_sources(store: Store, index: str, sources: Sequence[Source], embedder: IndexEmbedder,
                   count_tokens: TokenCounter, *, chunk_tokens: int = 200, overlap: int = 40,
                   max_file_bytes: int = MAX_FILE_BYTES, field: str = "text", folders: Sequence[str] = (),
                   progress: Progress | None = None) -> dict:
    """Index `sources` into `index` of `store` (created when new, with the embedder's dim); returns the
    counts: sources, ingested, chunks, unchanged, duplicates, dropped, removed, failed, index_chunks.

    `folders`: resolved folder paths that were listed whole; a source under one of them that the index
    holds but that no longer exists on disk is removed (a file deleted from an ingested folder)."""
    settings = f"{CHUNKER_VERSION}|{chunk_tokens}|{overlap}|{field}|{embedder_id(embedder)}"
    created = store.index_info(index) is None
    store.create_index(index, dim=embedder.dim, embedder=embedder_id(embedder))
    stats = {"index": index, "sources": len(sources), "ingested": 0, "chunks": 0, "unchanged": 0,
             "duplicates": 0, "dropped": 0, "removed": 0, "failed": []}
    try:
        _write(store, index, sources, settings, embedder, count_tokens, stats, progress or _silent,
               chunk_tokens=chunk_tokens, overlap=overlap, max_file_bytes=max_file_bytes, field=field,
               folders=list(folders))
        if created and not stats["chunks"]:
            why = "; ".join(f"{Path(f['source']).name}: {f['reason']}" for f in stats["failed"][:5])
            raise DataError(f"nothing to index: {why or 'no text'}")
    except BaseException:
        if created:
            store.drop_index(index)     # a first ingest that fails leaves no empty index behind
        raise
    stats["index_chunks"] = store.index_info(index)["chunks"]
    return stats


def _silent(stage: str, source: str, done: int, total: int) -> None:
    return None


def _write(store: Store, index: str, sources: Sequence[Source], settings: str, embedder: IndexEmbedder,
           count: TokenCounter, stats: dict, progress: Progress, **opts) -> None:
    known = store.source_digests(index)
    pending: list[tuple[str, str, list[Chunk]]] = []
    counts = {"embedded": 0, "read": 0, "written": 0}

    def flush(writer: IndexWriter) -> None:
        chunks = [c for _, _, cs in pending for c in cs]
        owners = [name for name, _, cs in pending for _ in cs]
        parts = []
        for at in range(0, len(chunks), EMBED_BATCH):
            batch = chunks[at:at + EMBED_BATCH]
            parts.append(embedder.embed([embedding_text(c) for c in batch]))
            counts["embedded"] += len(batch)
            progress("embedding", owners[at + len(batch) - 1], counts["embedded"], counts["read"])
        vectors = np.concatenate(parts)
        at = 0
        for name, digest, cs in pending:
            writer.replace_source(name, digest, cs, vectors[at:at + len(cs)])
            at += len(cs)
            counts["written"] += 1
            progress("writing", name, counts["written"], stats["ingested"])
        pending.clear()

    with store.write(index) as writer:
        for number, src in enumerate(sources, 1):
            progress("reading", src.name, number, len(sources))
            try:
                data = src.read_bytes(opts["max_file_bytes"])
                digest = hashlib.sha256(data + settings.encode()).hexdigest()
                if known.get(src.name) == digest:
                    stats["unchanged"] += 1
                    continue
                chunked = chunk_document(parse(src, data, field=opts["field"]), count,
                                         chunk_tokens=opts["chunk_tokens"], overlap=opts["overlap"])
            except (DataError, OSError) as e:
                reason = str(e) if isinstance(e, DataError) else f"cannot read ({e})"
                stats["failed"].append({"source": src.name, "reason": reason.replace(f"{src.name}: ", "")})
                continue
            if not chunked.chunks:
                stats["failed"].append({"source": src.name, "reason": "no text to index"})
                continue
            stats["ingested"] += 1
            stats["chunks"] += len(chunked.chunks)
            stats["duplicates"] += chunked.duplicates
            stats["dropped"] += chunked.dropped
            counts["read"] += len(chunked.chunks)
            pending.append((src.name, digest, chunked.chunks))
            if sum(len(cs) for _, _, cs in pending) >= EMBED_BATCH:
                flush(writer)
        if pending:
            flush(writer)
        # Files deleted from a folder that is ingested again leave the index with them.
        listed = {s.name for s in sources}
        for name in known:
            if name not in listed and any(name.startswith(f + "/") for f in opts["folders"]) \
                    and not Path(name).exists():
                writer.remove_source(name)
                stats["removed"] += 1

"""The documents API of the web console, over the served RAG index (`genforge serve --rag INDEX`):

    POST /v1/rag/documents     multipart/form-data `file` parts (+ optional `index`) -> NDJSON progress, counts
    GET  /v1/rag/documents     the index's sources and their chunk counts
    POST /v1/rag/search        {"query", "k", "mode"} -> the chunks chat retrieves for that question
    GET  /v1/rag/chunks/{id}   one chunk (the ids a chat response's `sources` carry)

Search, chunk and list run through the application layer's steps: the same `Retriever` as chat, in
the layer's process by default. An upload is checked whole before anything is written (a file that
is empty, too big or of a type `genforge rag ingest` does not read is a 400 naming it), then indexed
by data/ingest.py's `ingest_sources` in a thread of the server's process, with the server's
`SharedEmbedder` and a store connection of its own. Why here and not in the layer's process: uploads
are rare, and their progress streams back as it happens, which that process's call-and-answer pipe
does not do. The index changes in one transaction; the served retriever reads the index version from
the store on every search and the semantic cache's key holds that version, so the next question sees
the new chunks and an answer cached before the upload is never served after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import FormData, UploadFile

from genforge.common.errors import DataError, GenforgeError, NotFoundError
from genforge.common.store import open_store
from genforge.data.documents import (
    MAX_FILE_BYTES,
    Source,
    check_file_bytes,
    check_not_empty,
    hf_token_counter,
    kind_of,
)
from genforge.data.ingest import Progress, ingest_sources
from genforge.serve.app_config import AppConfig
from genforge.serve.embeddings import SharedEmbedder
from genforge.serve.gate import validated

log = logging.getLogger(__name__)
MAX_UPLOAD_FILES = 64
MAX_SEARCH_K = 50  # the retriever's candidate depth: beyond it the ranking is no longer fused
RAG_OFF = "RAG is off on this server (start it with --rag INDEX)"


class RagSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: Annotated[str, Field(max_length=8192)]
    k: Annotated[int, Field(ge=1, le=MAX_SEARCH_K)] | None = None
    mode: Literal["dense", "bm25", "hybrid"] | None = None


class _Abandoned(Exception):
    """The client left while its upload was being indexed: the ingest stops, nothing is written."""


def documents_router(config: AppConfig, steps: Any, embedder: SharedEmbedder, state_dir: Path) -> APIRouter:
    """The routes above. `steps`: the application layer's (serve/layer_steps.py), None when it is off;
    `state_dir`: the store the steps use when the config names none."""
    router = APIRouter()
    index = config.rag.index if steps is not None else None
    store_spec = config.store or str(state_dir)
    one_upload = threading.Lock()  # uploads are rare: one at a time keeps their writes in arrival order

    def served() -> str:
        if index is None:
            raise NotFoundError(RAG_OFF, param="rag", code="rag_off")
        return index

    @router.post("/v1/rag/documents")
    async def upload(request: Request) -> StreamingResponse:
        served()
        validated(request.scope)
        form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=16)
        try:
            target = form.get("index")
            if target is not None and target != index:
                raise GenforgeError(f"index {target!r}: this server serves index {index!r}; leave `index` out "
                                    "or ingest into other indexes with `genforge rag ingest`", param="index")
            sources = await _uploaded_sources(form)
        finally:
            await form.close()

        def work(progress: Progress) -> dict:
            shared = embedder.get()  # loaded on the first upload when the steps run in their own process
            with one_upload:
                store = open_store(store_spec)
                try:
                    return ingest_sources(store, index, sources, shared, hf_token_counter(shared.tokenizer),
                                          progress=progress)
                finally:
                    store.close()

        return StreamingResponse(_ndjson(work), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/rag/documents")
    async def documents() -> JSONResponse:
        name = served()
        counts = await steps.call("sources")
        return JSONResponse({"object": "list", "index": name,
                             "data": [{"source": s, "chunks": n} for s, n in counts.items()]})

    @router.post("/v1/rag/search")
    async def search(body: RagSearchRequest, request: Request) -> JSONResponse:
        served()
        validated(request.scope)
        if not body.query.strip():
            raise GenforgeError("query: is empty; give the question to search for", param="query")
        found = await steps.call("search", body.query, body.k or config.rag.k, body.mode or config.rag.mode)
        return JSONResponse({"object": "list", "data": [
            {"id": c.id, "source": c.source, "score": round(float(score), 6), "text": c.text} for c, score in found]})

    @router.get("/v1/rag/chunks/{chunk_id:path}")
    async def chunk(chunk_id: str) -> JSONResponse:
        name = served()
        found = await steps.call("chunk", chunk_id)
        if found is None:
            raise NotFoundError(f"no chunk {chunk_id!r} in index {name!r} (a newer upload of its source may have "
                                "replaced it; search again)", param="id", code="chunk_not_found")
        return JSONResponse({"object": "rag.chunk", "id": found.id, "source": found.source, "text": found.text,
                             "position": found.position, "heading": found.metadata.get("heading")})

    return router


async def _uploaded_sources(form: FormData) -> list[Source]:
    """The form's `file` parts as sources named by their file names; a 400 naming the first bad one."""
    parts = form.getlist("file")
    if not parts:
        raise GenforgeError("no file: send the documents as multipart/form-data `file` parts", param="file")
    sources: dict[str, Source] = {}
    for number, part in enumerate(parts, 1):
        if not isinstance(part, UploadFile):
            raise GenforgeError(f"file {number}: is a text field, not a file; send it as a file part", param="file")
        # The name the user knows the file by (a browser sends no folders; anything else is cut off).
        name = PurePosixPath((part.filename or "").replace("\\", "/")).name.strip()
        if not name:
            raise GenforgeError(f"file {number}: the part has no file name; name it (e.g. notes.md)", param="file")
        if name in sources:
            raise GenforgeError(f"{name}: sent twice in one upload; send each file once", param="file")
        try:
            kind = kind_of(name)
            if part.size is not None:  # refused before its bytes are read
                check_file_bytes(name, part.size, MAX_FILE_BYTES)
            data = await part.read()
            check_file_bytes(name, len(data), MAX_FILE_BYTES)
            check_not_empty(name, data)
        except DataError as e:
            raise DataError(e.message, param="file") from None
        sources[name] = Source(name, kind, data=data)
    return list(sources.values())


async def _ndjson(work: Callable[[Progress], dict]) -> AsyncIterator[str]:
    """Runs `work(progress)` in a thread; yields each progress event, then the final counts (or an error),
    one JSON object a line. A client that leaves stops the work before it writes anything."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict] = asyncio.Queue()
    abandoned = threading.Event()

    def put(item: dict) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            abandoned.set()

    def progress(stage: str, source: str, done: int, total: int) -> None:
        if abandoned.is_set():
            raise _Abandoned()
        put({"object": "rag.ingest.progress", "stage": stage, "source": source, "done": done, "total": total})

    def run() -> None:
        try:
            result = {"object": "rag.ingest", **work(progress)}
        except _Abandoned:
            return
        except GenforgeError as e:
            result = {"object": "error", "error": e.to_openai()["error"]}
        except BaseException as e:  # noqa: BLE001 - a bug: the stream still ends in shape, the log has the traceback
            error_id = f"err-{uuid.uuid4().hex[:12]}"
            log.error("internal error %s while indexing an upload", error_id, exc_info=e)
            result = {"object": "error", "error": {
                "message": f"internal server error (error id {error_id}); nothing was written, the server log "
                           "has the details", "type": "server_error", "param": None, "code": None}}
        put(result)

    threading.Thread(target=run, name="genforge-upload", daemon=True).start()
    try:
        while True:
            item = await events.get()
            yield json.dumps(item) + "\n"
            if item["object"] != "rag.ingest.progress":
                return
    finally:
        abandoned.set()

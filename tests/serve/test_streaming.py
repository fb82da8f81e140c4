"""The hand-written SSE chunks are byte-for-byte what the pydantic response models serialize to."""

from __future__ import annotations

import pytest

from genforge.serve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionChunk,
    DeltaMessage,
    sse,
)
from genforge.serve.streaming import ChunkEncoder

TEXTS = ["", "x", " hello", 'quote " and \\ backslash', "new\nline\ttab\r", "ünïcödé 日本 😀", "\x00\x1f\x7f",
         "</script>", "\u2028\u2029"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", [None, "stop", "length"])
def test_chunks_match_the_models(text: str, finish: str | None) -> None:
    rid, created, model = "cmpl-abc", 1700000000, 'my "model" ü'
    enc = ChunkEncoder(rid, created, model, chat=False)
    want = sse(CompletionChunk(id=rid, created=created, model=model,
                               choices=[CompletionChoice(index=3, text=text, finish_reason=finish)]))
    assert enc.token(3, text, finish) == want
    chat = ChunkEncoder(rid, created, model, chat=True)
    delta = DeltaMessage(content=text) if text else DeltaMessage()
    want = sse(ChatCompletionChunk(id=rid, created=created, model=model,
                                   choices=[ChatChunkChoice(index=1, delta=delta, finish_reason=finish)]))
    assert chat.token(1, text, finish) == want
    role = sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[
        ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))]))
    assert chat.role(0) == role

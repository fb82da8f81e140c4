"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests follow the OpenAI spec field for field; genforge's extensions (top_k,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids) are extra fields, as vLLM does.
Unknown fields are ignored rather than rejected, so clients that send newer or vendor-specific
fields (user, store, metadata, ...) keep working - except OpenAI fields that would change the
answer and that genforge does not implement (logit_bias, best_of, tools, ...):
those are refused with a 400 naming the field unless they carry their default (null or the
documented no-op value), so a client never gets an answer that silently ignored what it asked.
Ranges and sizes of everything a client controls live here, so a bad value is a 400 that names
the field before anything reaches the engine.

`response_format` is OpenAI's: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "description", "schema", "strict"}}; serve/structured.py compiles it into the
grammar that constrains decoding. Any error in its shape is a 400 with param "response_format".
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_serializer
from pydantic_core import PydanticCustomError

from genforge.models.sampling import SAMPLING_RANGES

# More choices than this per request would let one request take over the whole batch.
MAX_N = 16
MAX_PROMPTS = 64  # prompts in one /v1/completions batch (each also counts against the queue)
MAX_STOP = 4  # as OpenAI: up to 4 stop sequences
MAX_STOP_CHARS = 256  # each; matched at every step, so the length is work per token
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 1024
MAX_TEMPERATURE = 2.0  # OpenAI's API cap (the sampler itself takes any temperature >= 0)


def _range(name: str, **extra: float) -> Any:
    """pydantic bounds from models.sampling's ranges: the HTTP layer and the sampler agree."""
    return Field(**{**SAMPLING_RANGES[name].field_kwargs(), **extra})


def _unsupported(*defaults: Any) -> AfterValidator:
    """Accept a field only at its default (None or one of `defaults`); otherwise a 400 naming it."""

    def check(value: Any) -> Any:
        if value is None or any(value == d for d in defaults):
            return value
        raise PydanticCustomError("unsupported", "is not supported by this server; leave it out")

    return AfterValidator(check)


_Unsupported = Annotated[Any, _unsupported()]
StopStr = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    """OpenAI's `response_format.json_schema` (Structured Outputs)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # absent: any JSON object
    strict: bool | None = None  # the grammar is enforced either way


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_or_none(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow; None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_object" or self.json_schema is None or self.json_schema.schema_ is None:
            return {"type": "object"}
        return self.json_schema.schema_


def _response_format(value: Any) -> ResponseFormat | None:
    """Parse `response_format`; every mistake in it is reported on the field itself (param
    "response_format"), with the inner path in the message."""
    if value is None:
        return None
    try:
        fmt = ResponseFormat.model_validate(value)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if where == "type" and err["type"] == "literal_error":
            msg = (f"unknown type {err['input']!r}; expected 'text', 'json_object' or 'json_schema'"
                   if isinstance(err["input"], str) else "type must be 'text', 'json_object' or 'json_schema'")
        else:
            msg = f"{where}: {err['msg']}" if where else err["msg"]
        raise PydanticCustomError("response_format", "{msg}", {"msg": msg}) from None
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise PydanticCustomError("response_format", 'type "json_schema" needs a "json_schema" object '
                                  '({"name": ..., "schema": {...}})')
    return fmt


class WatermarkField(_Request):
    key: Annotated[str, Field(min_length=1, max_length=4096)]

    def __repr__(self) -> str:  # the secret never reaches a log line or a trace
        return "WatermarkField(key=***)"

    __str__ = __repr__


class _SamplingFields(_Request):
    """Fields the two generation endpoints share."""

    model: str | None = None  # optional as in vLLM: absent means the one served model
    max_tokens: Annotated[int, _range("max_tokens")] | None = None
    temperature: Annotated[float, _range("temperature", le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, _range("top_p")] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, _range("seed")] | None = None  # any 64-bit integer
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, _range("presence_penalty")] = 0.0
    frequency_penalty: Annotated[float, _range("frequency_penalty")] = 0.0
    # OpenAI's end-user id; registry serving keeps each user on one version (serve/versions.py)
    user: str | None = None
    # genforge / vLLM extensions
    top_k: Annotated[int, _range("top_k")] | None = None  # -1 or 0: no top-k cut
    repetition_penalty: Annotated[float, _range("repetition_penalty")] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, _range("min_tokens")] = 0
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    # OpenAI fields genforge does not implement: refused unless at their defaults
    logit_bias: Annotated[Any, _unsupported({})] = None
    # genforge extension: {"key": "..."} samples with this tenant's watermark key, on a deployment that
    # watermarks (serve/labelling.py); it can change the key, never turn the watermark off
    watermark: WatermarkField | None = None
    response_format: Annotated[Any, AfterValidator(_response_format)] = None  # ResponseFormat | None
    tools: Annotated[Any, _unsupported([])] = None
    tool_choice: Annotated[Any, _unsupported("none")] = None
    functions: Annotated[Any, _unsupported([])] = None
    function_call: Annotated[Any, _unsupported("none")] = None
    prediction: _Unsupported = None
    audio: _Unsupported = None
    modalities: Annotated[Any, _unsupported(["text"])] = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would end every request at once


class CompletionRequest(_SamplingFields):
    # A string, a batch of strings, one token-id list, or a batch of token-id lists.
    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[int] | Annotated[
        list[list[int]], Field(max_length=MAX_PROMPTS)]
    logprobs: Annotated[int, _range("logprobs")] | None = None
    echo: bool = False
    best_of: Annotated[Any, _unsupported(1)] = None
    suffix: Annotated[Any, _unsupported("")] = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, _range("logprobs")] | None = None
    add_generation_prompt: bool = True  # vLLM extension
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extension, passed to the template
    cache: bool | None = None  # genforge extension: false = never answer from / store in the semantic cache


MAX_EMBED_INPUTS = 2048  # as OpenAI


class EmbeddingRequest(_Request):
    model: str | None = None
    # A string, a batch of strings, one token-id list, or a batch of token-id lists (the embedder's ids).
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBED_INPUTS)] | Annotated[
        list[int], Field(min_length=1)] | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "genforge"
    root: str | None = None  # what was loaded (vLLM extension)
    parent: str | None = None  # an adapter's base model (vLLM extension)
    max_model_len: int | None = None  # vLLM extension


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    watermark: dict | None = None  # genforge extension: set by a watermarking deployment (serve/labelling.py)

    @model_serializer(mode="wrap")
    def _extension_only_when_set(self, handler: Any) -> dict:
        return _drop_unset_extensions(handler(self))


def _drop_unset_extensions(out: dict) -> dict:
    """The OpenAI shape exactly, unless RAG answered (`sources`) or the deployment watermarks."""
    for name in ("sources", "watermark"):
        if name in out and out[name] is None:
            del out[name]
    return out


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    sources: list[dict] | None = None  # genforge extension: RAG's retrieved chunks (id, source, score)
    watermark: dict | None = None  # genforge extension: set by a watermarking deployment (serve/labelling.py)

    @model_serializer(mode="wrap")
    def _extension_only_when_set(self, handler: Any) -> dict:
        return _drop_unset_extensions(handler(self))


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict:
        # OpenAI sends only what changed: {"role": ...} first, then {"content": ...}, then {}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    watermark: dict | None = None  # as ChatCompletionResponse's

    @model_serializer(mode="wrap")
    def _extension_only_when_set(self, handler: Any) -> dict:
        return _drop_unset_extensions(handler(self))


class CompletionChunk(BaseModel):
    """Streamed completions reuse the non-streamed shape, one token's text per choice."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    watermark: dict | None = None  # as CompletionResponse's

    @model_serializer(mode="wrap")
    def _extension_only_when_set(self, handler: Any) -> dict:
        return _drop_unset_extensions(handler(self))


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """The OpenAI error object; `code` is kept as given (OpenAI uses strings, vLLM the status)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------- helpers for the handlers


def sse(obj: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON object."""
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chat_logprobs(entries: list[tuple[str, float | None, list[tuple[str, float]] | None]]) -> ChatLogprobs:
    """Chat-shaped logprobs from (token text, logprob, top alternatives) triples."""
    return ChatLogprobs(content=[
        TokenLogprob(token=tok, logprob=lp if lp is not None else float("-inf"), bytes=list(tok.encode()),
                     top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in top or []])
        for tok, lp, top in entries])


def completion_logprobs(entries: list[tuple[str, float | None, list[tuple[str, float]] | None]],
                        offset: int = 0) -> CompletionLogprobs:
    """Legacy completions logprobs: parallel lists; text_offset counts characters from `offset`."""
    out = CompletionLogprobs()
    for tok, lp, top in entries:
        out.text_offset.append(offset)
        offset += len(tok)
        out.tokens.append(tok)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(dict(top) if top is not None else None)
    return out


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 when encoding_format is base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage

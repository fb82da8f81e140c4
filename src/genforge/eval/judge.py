"""LLM-as-a-judge: one judgment from any OpenAI-compatible endpoint, in strict, validated JSON.

A judgment is asked with `response_format` json_schema (the OpenAI Structured Outputs shape), so a
server that constrains decoding (genforge serve, vLLM, OpenAI) can only answer in the schema. The
answer is still validated here, because many servers ignore the schema: text around the JSON is
repaired away (the first JSON object is taken), anything else is asked again (bounded), and a score
outside the rubric is rejected and asked again, never clipped; after `attempts` bad answers the
judgment is a failure, reported as one.

Transport failures (connection errors, timeouts, 429, 5xx) are retried with exponential backoff;
when the judge stays unreachable a JudgeUnreachableError ends the work (the caller keeps what is
done). Valid judgments are cached on disk (SQLite), keyed by everything that determines them, so a
rerun asks the judge nothing it already answered.

eval talks to judges over HTTP only: this module never imports serve.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from genforge.common.errors import ConfigError, GenforgeError

POINTWISE_RUBRIC = (
    "You grade answers to questions. Rate the answer from 1 (wrong, irrelevant or unreadable) to 10 "
    "(correct, complete and clear), judging it against the reference answer when one is given. "
    'Reply with a JSON object only: {"score": <integer 1-10>, "reason": "<one sentence>"}.')

PAIRWISE_RUBRIC = (
    "You compare two answers to the same question. Decide which answer is better: more correct, "
    "more complete and clearer, judged against the reference answer when one is given; the order in "
    "which they are shown says nothing about their quality. Say \"tie\" only when neither is better. "
    'Reply with a JSON object only: {"winner": "A" | "B" | "tie", "reason": "<one sentence>"}.')

FAITHFULNESS_RUBRIC = (
    "You check an answer against the numbered sources it was written from. List the factual claims the answer "
    "makes (short, at most 8) and mark each supported only when the sources state it. An answer that makes no "
    "claim (it says the sources do not hold the answer, or says nothing) has no claims. "
    'Reply with a JSON object only: {"claims": [{"claim": "<claim>", "supported": true | false}]}.')

DEFAULT_SCORES = (1, 10)  # what POINTWISE_RUBRIC asks for
WINNERS = ("A", "B", "tie")
RESPONSE_FORMATS = ("json_schema", "json_object", "none")


class JudgeError(GenforgeError):
    """The judge cannot be used as configured (unknown model, refused key, rejected request)."""


class JudgeUnreachableError(JudgeError):
    """The judge did not answer after every retry (connection refused, timeouts, 429, 5xx)."""

    status = 503


class InvalidJudgment(ValueError):
    """The judge's answer is not a judgment (no JSON object, missing or mistyped fields)."""


class OutOfRubric(InvalidJudgment):
    """The judge's score lies outside the rubric's range: rejected, never clipped."""


@dataclass
class JudgeConfig:
    """Where the judge is and how to ask it. `temperature` > 0 so that repeats can differ (each
    repeat and attempt has its own seed, so a rerun asks the very same questions)."""

    url: str
    model: str
    key_env: str = "GENFORGE_JUDGE_API_KEY"
    repeats: int = 3
    concurrency: int = 4
    temperature: float = 0.7
    max_tokens: int = 128
    timeout: float = 60.0  # seconds for one HTTP call
    retries: int = 4  # transport retries of one call (connection errors, timeouts, 429, 5xx)
    backoff: float = 0.5  # seconds before the first transport retry, doubled after each
    retry_after_max: float = 10.0  # at most this long for a 429/503's Retry-After (else the backoff)
    attempts: int = 3  # answers asked for one judgment while the judge answers badly
    response_format: str = "json_schema"
    score_range: tuple[int, int] = DEFAULT_SCORES  # the scores the pointwise rubric asks for
    reason_max_chars: int | None = 200  # maxLength of the reason in the schema (None: unbounded)
    pointwise_rubric: str = POINTWISE_RUBRIC
    pairwise_rubric: str = PAIRWISE_RUBRIC
    faithfulness_rubric: str = FAITHFULNESS_RUBRIC
    max_claims: int = 8  # claims one faithfulness judgment may list
    system_rubric: bool = True  # the rubric as a system message (False: at the head of the user turn)
    cache_path: Path | None = None
    # Test-only: the score range the schema sent to the judge allows (None: the rubric's), so a
    # test can let a constrained judge answer out of the rubric and see the answer rejected.
    schema_score_range: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.response_format not in RESPONSE_FORMATS:
            raise ConfigError(f"judge response format {self.response_format!r} is not one of "
                              f"{', '.join(RESPONSE_FORMATS)}")
        for name in ("repeats", "concurrency", "attempts", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"judge {name} must be at least 1 (got {getattr(self, name)})")
        if self.retries < 0 or self.timeout <= 0:
            raise ConfigError("judge retries must be >= 0 and its timeout > 0 seconds")
        low, high = self.score_range
        if low >= high:
            raise ConfigError(f"judge score range {low}-{high} is empty; give low < high")
        for name in ("pointwise_rubric", "pairwise_rubric", "faithfulness_rubric"):
            if not getattr(self, name).strip():
                raise ConfigError(f"the judge's {name.replace('_', ' ')} is empty; give the rubric's text")
        # The default rubric names its scale in words: another range would contradict it.
        if self.pointwise_rubric == POINTWISE_RUBRIC and tuple(self.score_range) != DEFAULT_SCORES:
            raise ConfigError(f"the default pointwise rubric asks for scores 1-10, not {low}-{high}; give your own "
                              f"rubric that asks for {low}-{high} (--judge-rubric FILE)", param="judge_scores")


def load_rubric(path: str | Path, flag: str = "--judge-rubric") -> str:
    """A rubric's text from a file (UTF-8, surrounding whitespace dropped); ConfigError naming `flag`
    when the file is missing, unreadable or empty."""
    param = flag.lstrip("-").replace("-", "_")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file; give a text file holding the judge's rubric",
                          param=param) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read it as UTF-8 text ({e})", param=param) from None
    if not text:
        raise ConfigError(f"{flag} {path} is empty; write the rubric the judge should follow in it", param=param)
    return text


def retry_after(response: Any, cap: float) -> float | None:
    """Seconds a 429/503 asks the client to wait (`retry-after-ms`, or `Retry-After` in seconds or as
    an HTTP date), at most `cap`; None when it asks nothing readable."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    seconds: float | None = None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            seconds = float(ms) / 1000
        elif (value := headers.get("retry-after")) is not None:
            try:
                seconds = float(value)
            except ValueError:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None
    if seconds is None or seconds != seconds:  # nan
        return None
    return min(max(seconds, 0.0), cap)


def _reason(max_chars: int | None) -> dict:
    # A bound on the reason lets a small constrained judge close the JSON before max_tokens.
    return {"type": "string", **({"maxLength": max_chars} if max_chars else {})}


def pointwise_schema(low: int, high: int, reason_max_chars: int | None = None) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["score", "reason"],
            "properties": {"score": {"type": "integer", "minimum": low, "maximum": high},
                           "reason": _reason(reason_max_chars)}}


def pairwise_schema(reason_max_chars: int | None = None) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["winner", "reason"],
            "properties": {"winner": {"type": "string", "enum": list(WINNERS)},
                           "reason": _reason(reason_max_chars)}}


def faithfulness_schema(max_claims: int, claim_max_chars: int | None = None) -> dict:
    claim = {"type": "object", "additionalProperties": False, "required": ["claim", "supported"],
             "properties": {"claim": _reason(claim_max_chars), "supported": {"type": "boolean"}}}
    return {"type": "object", "additionalProperties": False, "required": ["claims"],
            "properties": {"claims": {"type": "array", "items": claim, "maxItems": max_claims}}}


# ---------------------------------------------------------------- parsing the judge's answer


def first_json_object(text: str) -> dict | None:
    """The first JSON object inside `text` (prose, code fences around it), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def parse_judgment(text: str, kind: str, score_range: tuple[int, int] = (1, 10)) -> tuple[dict, bool]:
    """({"score" or "winner", "reason"}, repaired) from the judge's answer text.

    `repaired` is True when the JSON had to be cut out of surrounding text. Raises InvalidJudgment
    (OutOfRubric for a score outside `score_range`).
    """
    try:
        obj, repaired = json.loads(text), False
    except json.JSONDecodeError:
        obj, repaired = first_json_object(text), True
    if not isinstance(obj, dict):
        raise InvalidJudgment(f"no JSON object in the judge's answer: {text[:120]!r}")
    if kind == "faithfulness":
        return _claims(obj), repaired
    reason = obj.get("reason")
    if not isinstance(reason, str):
        raise InvalidJudgment(f"the judgment has no string 'reason': {obj!r}"[:200])
    if kind == "pointwise":
        score = obj.get("score")
        if isinstance(score, float) and score.is_integer():
            score = int(score)
        if isinstance(score, bool) or not isinstance(score, int):
            raise InvalidJudgment(f"the judgment's 'score' is not an integer: {score!r}")
        low, high = score_range
        if not low <= score <= high:
            raise OutOfRubric(f"score {score} is outside the rubric's {low}-{high}")
        return {"score": score, "reason": reason}, repaired
    winner = obj.get("winner")
    match = {w.lower(): w for w in WINNERS}.get(winner.strip().lower()) if isinstance(winner, str) else None
    if match is None:
        raise InvalidJudgment(f"the judgment's 'winner' is not one of A, B, tie: {winner!r}")
    return {"winner": match, "reason": reason}, repaired


def _claims(obj: dict) -> dict:
    """A faithfulness judgment: the claims, how many the sources support, and their ratio (None for
    an answer that makes no claim: nothing to be faithful or unfaithful about)."""
    claims = obj.get("claims")
    if not isinstance(claims, list):
        raise InvalidJudgment(f"the judgment has no 'claims' list: {obj!r}"[:200])
    for c in claims:
        if not (isinstance(c, dict) and isinstance(c.get("claim"), str) and isinstance(c.get("supported"), bool)):
            raise InvalidJudgment(f"a claim is not {{\"claim\": str, \"supported\": bool}}: {c!r}"[:200])
    supported = sum(c["supported"] for c in claims)
    return {"claims": [{"claim": c["claim"], "supported": c["supported"]} for c in claims], "supported": supported,
            "total": len(claims), "faithfulness": supported / len(claims) if claims else None}


# ---------------------------------------------------------------- prompts


def _messages(rubric: str, parts: list[str], system: bool) -> list[dict]:
    # system=False puts the rubric at the head of the user turn: for chat templates without a system
    # role, and for small contexts, where the system turn's own markup costs tokens.
    if system:
        return [{"role": "system", "content": rubric}, {"role": "user", "content": "\n\n".join(parts)}]
    return [{"role": "user", "content": "\n\n".join([rubric, *parts])}]


def pointwise_messages(rubric: str, question: str, answer: str, reference: str | None,
                       system: bool = True) -> list[dict]:
    parts = [f"Question:\n{question}"]
    if reference:
        parts.append(f"Reference answer:\n{reference}")
    parts.append(f"Answer to grade:\n{answer}")
    return _messages(rubric, parts, system)


def pairwise_messages(rubric: str, question: str, first: str, second: str, reference: str | None,
                      system: bool = True) -> list[dict]:
    parts = [f"Question:\n{question}"]
    if reference:
        parts.append(f"Reference answer:\n{reference}")
    parts += [f"Answer A:\n{first}", f"Answer B:\n{second}"]
    return _messages(rubric, parts, system)


def faithfulness_messages(rubric: str, question: str, answer: str, sources: list[str],
                          system: bool = True) -> list[dict]:
    parts = [f"Question:\n{question}", "Sources:\n" + "\n\n".join(sources), f"Answer to check:\n{answer}"]
    return _messages(rubric, parts, system)


# ---------------------------------------------------------------- the cache


class JudgmentCache:
    """Valid judgments on disk (SQLite: each insert is atomic, so a killed run loses nothing done)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM judgments WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?)", (key, json.dumps(value)))
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- the judge


class Judge:
    """Asks one OpenAI-compatible endpoint for judgments; thread-safe (one client, one cache)."""

    def __init__(self, config: JudgeConfig):
        try:
            import openai
        except ImportError:
            raise ConfigError("the judge needs the openai client: pip install 'genforge[judge]'") from None

        self.config = config
        self._openai = openai
        # No key on the command line, ever: it comes from the environment. A local judge without
        # auth accepts any key, and the client insists on one.
        key = os.environ.get(config.key_env) or "unused"
        self.client = openai.OpenAI(base_url=config.url, api_key=key, timeout=config.timeout, max_retries=0)
        self.cache = JudgmentCache(config.cache_path) if config.cache_path else None
        self.http_calls = 0  # requests sent (retries included), for reports and tests
        self._count = threading.Lock()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.client.close()

    # -- public: one judgment

    def pointwise(self, question: str, answer: str, reference: str | None = None, repeat: int = 0) -> dict:
        messages = pointwise_messages(self.config.pointwise_rubric, question, answer, reference,
                                      self.config.system_rubric)
        low, high = self.config.schema_score_range or self.config.score_range
        schema = pointwise_schema(low, high, self.config.reason_max_chars)
        return self._judge("pointwise", messages, schema, repeat, order=None)

    def pairwise(self, question: str, first: str, second: str, reference: str | None = None,
                 repeat: int = 0, order: str = "AB") -> dict:
        """Winner as shown to the judge ("A" = `first`); `order` only names the presentation."""
        messages = pairwise_messages(self.config.pairwise_rubric, question, first, second, reference,
                                     self.config.system_rubric)
        return self._judge("pairwise", messages, pairwise_schema(self.config.reason_max_chars), repeat, order=order)

    def faithfulness(self, question: str, answer: str, sources: list[str], repeat: int = 0) -> dict:
        """The answer's claims, each marked supported or not by `sources` (the text the answer's
        prompt held, numbered as the prompt numbered it)."""
        messages = faithfulness_messages(self.config.faithfulness_rubric, question, answer, sources,
                                         self.config.system_rubric)
        schema = faithfulness_schema(self.config.max_claims, self.config.reason_max_chars)
        return self._judge("faithfulness", messages, schema, repeat, order=None)

    # -- internals

    def _judge(self, kind: str, messages: list[dict], schema: dict, repeat: int, order: str | None) -> dict:
        cfg = self.config
        key = cache_key(url=cfg.url, model=cfg.model, kind=kind, messages=messages, order=order, repeat=repeat,
                        rubric=getattr(cfg, f"{kind}_rubric"), schema=schema, response_format=cfg.response_format,
                        temperature=cfg.temperature, max_tokens=cfg.max_tokens, attempts=cfg.attempts,
                        scores=list(cfg.score_range) if kind == "pointwise" else None)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return {**hit, "cached": True}
        outcome: dict[str, Any] = {"ok": False, "attempts": 0, "invalid": 0, "out_of_rubric": 0, "repaired": False,
                                   "error": None, "raw": None, "rejected": []}
        for attempt in range(cfg.attempts):
            text, finish = self._complete(messages, schema, kind, seed=repeat * 1000 + attempt)
            outcome["attempts"], outcome["raw"] = attempt + 1, text
            try:
                try:
                    judgment, repaired = parse_judgment(text, kind, cfg.score_range)
                except InvalidJudgment as e:
                    if finish == "length":  # say why: the JSON was cut, not malformed
                        raise type(e)(f"{e} (cut at max_tokens={cfg.max_tokens}: raise it)") from None
                    raise
            except OutOfRubric as e:
                outcome["out_of_rubric"] += 1
                outcome["error"] = str(e)
                outcome["rejected"].append(text)
                continue
            except InvalidJudgment as e:
                outcome["invalid"] += 1
                outcome["error"] = str(e)
                outcome["rejected"].append(text)  # kept: what the judge said is the evidence
                continue
            outcome.update(judgment, ok=True, repaired=repaired, error=None)
            if self.cache is not None:
                self.cache.put(key, outcome)
            break
        return {**outcome, "cached": False}

    def _request(self, messages: list[dict], schema: dict, kind: str, seed: int) -> dict:
        cfg = self.config
        body: dict[str, Any] = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens,
                                "temperature": cfg.temperature, "seed": seed}
        if cfg.response_format == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": f"{kind}_judgment", "strict": True, "schema": schema}}
        elif cfg.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        return body

    def _complete(self, messages: list[dict], schema: dict, kind: str, seed: int) -> tuple[str, str | None]:
        """The judge's answer text and finish reason; transport failures retried with exponential
        backoff and jitter, or after the wait a 429/503's Retry-After asks for (bounded)."""
        oa, cfg = self._openai, self.config
        body = self._request(messages, schema, kind, seed)
        last: Exception | None = None
        for retry in range(cfg.retries + 1):
            if retry:
                asked = retry_after(getattr(last, "response", None), cfg.retry_after_max)
                time.sleep(asked if asked is not None else cfg.backoff * 2 ** (retry - 1) * (1 + random.random() / 4))
            with self._count:
                self.http_calls += 1
            try:
                choice = self.client.chat.completions.create(**body).choices[0]
                return choice.message.content or "", choice.finish_reason
            except oa.NotFoundError as e:
                raise self._missing_model(e) from None
            except oa.AuthenticationError:
                raise JudgeError(f"the judge at {cfg.url} refused the API key (401); put a valid key in the "
                                 f"environment variable {cfg.key_env} (never on the command line)") from None
            except (oa.APIConnectionError, oa.RateLimitError, oa.InternalServerError) as e:
                last = e  # APITimeoutError is an APIConnectionError
            except oa.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in (408, 409):
                    message = e.body.get("message", e.message) if isinstance(e.body, dict) else e.message
                    hint = (" (for a judge without structured outputs, use --judge-response-format "
                            "json_object or none)" if "response_format" in str(message) else "")
                    raise JudgeError(f"the judge at {cfg.url} rejected the request ({e.status_code}): "
                                     f"{message}{hint}") from None
                last = e
        if isinstance(last, oa.APITimeoutError):
            why = f"every call timed out after {cfg.timeout:g} s"
        elif isinstance(last, oa.APIConnectionError):
            why = f"cannot connect ({last.__cause__ or last})"
        else:
            why = f"it answered {getattr(last, 'status_code', '?')}: {getattr(last, 'message', last)}"
        raise JudgeUnreachableError(f"the judge at {cfg.url} did not answer after {cfg.retries + 1} tries: {why}; "
                                    "check that it is running (and --judge-timeout), then rerun: judgments "
                                    "already made are cached and not asked again")

    def _missing_model(self, error: Exception) -> JudgeError:
        cfg = self.config
        try:
            names = sorted(m.id for m in self.client.models.list())
        except self._openai.APIError:
            return JudgeError(f"the judge at {cfg.url} answered 404 to a chat completion for model "
                              f"'{cfg.model}' and lists no models; is --judge-url the OpenAI-compatible base URL "
                              "(usually ending in /v1)?")
        return JudgeError(f"the judge at {cfg.url} has no model '{cfg.model}'; it serves "
                          f"{', '.join(repr(n) for n in names) or 'none'}: pass one of them as --judge-model")

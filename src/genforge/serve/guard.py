"""The guard of the request path: input firewall (prompt injection, PII) and the streaming output filter.

Policy per deployment: `block` refuses a request with an injection or PII (400, code
`content_filtered`), `redact` replaces PII with typed placeholders and refuses injections, `log`
changes nothing and only reports. The output filter redacts PII and the deployment's banned
patterns from streamed text as it streams (see `StreamFilter`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import numpy as np
import regex

from genforge.common.errors import ConfigError, GenforgeError
from genforge.data.pii import PATTERNS, PII_TYPES, Pattern, Placeholders, Span, candidates, resolve
from genforge.serve.injection import InjectionDetector, rule_hits, segment_vectors

POLICIES = ("block", "redact", "log")
PLACEHOLDER_RE = r"\[(?:" + "|".join(PII_TYPES) + r")_\d+\]"
BANNED_PLACEHOLDER = "[FILTERED]"
# Banned text always goes; allowlisted text is then kept verbatim, ahead of any PII reading of it.
_PRIORITY = {"BANNED": -2, "ALLOW": -1, **{t: i for i, t in enumerate(PII_TYPES)}}
# A complete match this close to the end may still be undone by what comes next (`(?!\.\d)`).
_LOOKAHEAD = 2
# Characters of already emitted text kept so lookbehinds see what precedes the held text.
_CONTEXT = 16


class ContentFilteredError(GenforgeError):
    """The guard refused the request; the message says what it found."""

    status = 400

    def __init__(self, message: str, *, param: str | None = "messages", code: str | None = "content_filtered"):
        super().__init__(message, param=param, code=code)


def _priority(s: Span) -> int:
    return _PRIORITY[s.type]


def _compile(patterns: list[str], type_: str, what: str) -> list[Pattern]:
    out = []
    for p in patterns:
        try:
            rx = regex.compile(p, regex.V0)
        except (regex.error, TypeError) as e:
            raise ConfigError(f"guard {what} pattern {p!r} is not a valid regular expression ({e}); fix or "
                              "remove it", param=f"guard.{what}") from e
        if rx.fullmatch(""):
            raise ConfigError(f"guard {what} pattern {p!r} matches the empty string, so it would match "
                              "everywhere; make it match at least one character", param=f"guard.{what}")
        out.append(Pattern(type_, rx, lambda s: (0, len(s)), _PRIORITY[type_]))
    return out


def _replace(text: str, spans: list[Span], placeholders: Placeholders) -> str:
    out, last = [], 0
    for sp in spans:
        out.append(text[last:sp.start])
        if sp.type == "BANNED":
            out.append(BANNED_PLACEHOLDER)
        elif sp.type == "ALLOW":
            out.append(sp.text)
        else:
            out.append(placeholders.get(sp.type, sp.text))
        last = sp.end
    out.append(text[last:])
    return "".join(out)


@dataclass
class TextScan:
    """What the guard found in one text."""

    injection: bool
    score: float
    detector_score: float
    rules: list[str]
    pii: list[Span]
    redacted: str
    judged: str = ""  # the text as injection detection reads it (allowlisted parts blanked out)


@dataclass
class GuardResult:
    """The input check of one request. `redacted` is the text, or the messages, as they go on."""

    injection: bool
    score: float
    rules: list[str]
    scans: list[TextScan]
    redacted: str | list[dict]
    action: str  # "allowed" | "redacted" | "logged" (a blocked request raises ContentFilteredError)
    reason: str
    placeholders: Placeholders
    where: list[str] = field(default_factory=list)  # "message 1", ... for each scan
    detector_pending: bool = False  # checked with detector=False: `Guard.finish_input` runs it

    @property
    def pii(self) -> list[Span]:
        return [sp for s in self.scans for sp in s.pii]


class StreamFilter:
    """Redacts PII and banned patterns from streamed text, holding back only what could still match.

    After each delta the filter finds the earliest position from which some pattern could still
    match given more text (a partial match, or a complete match that more text could extend or undo)
    and emits everything before it. Matches are decided on exactly the same characters as for the
    whole text, so any split of a text into deltas gives the same output as filtering it whole; the
    hold is capped at `max_hold` characters so a stream never stalls.
    """

    def __init__(self, patterns: list[Pattern], placeholders: Placeholders, *, redact: bool = True,
                 max_hold: int = 64):
        self.patterns = patterns
        self.placeholders = placeholders
        self.redact = redact
        self.max_hold = max_hold
        self.found: list[Span] = []  # offsets into the whole streamed text
        self._ctx = ""
        self._buf = ""
        self._offset = 0

    def _hold_start(self, text: str, base: int) -> int:
        hold, spans = len(text), []
        for p in self.patterns:
            for m in p.regex.finditer(text, base, partial=True):
                if m.partial or m.end() >= len(text) - _LOOKAHEAD:
                    hold = min(hold, m.start())
                else:
                    spans.append((m.start(), m.end()))
        # a cut inside any match (valid or not) would let the rest be matched differently
        moved = True
        while moved:
            moved = False
            for s, e in spans:
                if s < hold < e:
                    hold, moved = s, True
        return max(hold, base)

    def _emit(self, cut: int, forced: bool) -> str:
        text, base = self._ctx + self._buf, len(self._ctx)
        end = base + cut
        if forced:
            found = candidates(text[:end], self.patterns, pos=base)
        else:
            found = [s for s in candidates(text, self.patterns, pos=base) if s.end <= end]
        spans = [Span(s.type, s.start - base, s.end - base, s.text) for s in resolve(found, _priority)]
        piece = self._buf[:cut]
        self.found += [Span(s.type, s.start + self._offset, s.end + self._offset, s.text)
                       for s in spans if s.type != "ALLOW"]
        self._ctx = (self._ctx + piece)[-_CONTEXT:]
        self._buf = self._buf[cut:]
        self._offset += cut
        return _replace(piece, spans, self.placeholders) if self.redact else piece

    def feed(self, delta: str) -> str:
        """Add streamed text; return the part that is safe to emit now (possibly "")."""
        self._buf += delta
        text, base = self._ctx + self._buf, len(self._ctx)
        natural = self._hold_start(text, base) if self._buf else base
        hold = max(natural, len(text) - self.max_hold)
        return self._emit(hold - base, forced=hold > natural) if hold > base else ""

    def flush(self) -> str:
        """The end of the stream: everything still held, filtered."""
        return self._emit(len(self._buf), forced=False)


class Guard:
    """Input and output guard of one deployment.

    `embedder` (a `models.embeddings.Embedder`) enables the learned detector; without one only the
    rules judge injection. `injection_threshold` defaults to the detector file's threshold.
    `allowlist` patterns mark text that is never reported (neither as injection nor as PII);
    `banned` patterns are removed from model output.
    """

    def __init__(self, policy: str = "redact", injection_threshold: float | None = None,
                 allowlist: list[str] = (), banned: list[str] = (), embedder=None,
                 detector: InjectionDetector | None = None, max_hold: int = 64):
        if policy not in POLICIES:
            raise ConfigError(f"guard policy {policy!r} is not one of {', '.join(POLICIES)}", param="guard.policy")
        self.policy = policy
        self.embedder = embedder
        self.detector = None
        if embedder is not None:
            self.detector = detector if detector is not None else InjectionDetector.load()
            if (self.detector.embedder_name, self.detector.embedder_version) != (embedder.name, embedder.version):
                raise ConfigError(f"the injection detector was trained on embedder {self.detector.embedder_name} "
                                  f"({self.detector.embedder_version}), not {embedder.name} ({embedder.version}); "
                                  "retrain it with genforge.jobs.guard.train_injection_detector", param="guard")
        default = self.detector.threshold if self.detector is not None else 0.5
        self.threshold = float(default if injection_threshold is None else injection_threshold)
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"guard injection_threshold {self.threshold} must be in (0, 1]",
                              param="guard.injection_threshold")
        # The guard's own placeholders ([EMAIL_1]) come back in later turns of a redacted conversation;
        # judged as text, the detector took their brackets for an attack (0.96 for "Mail [EMAIL_1] about").
        self.allow = _compile([PLACEHOLDER_RE, *allowlist], "ALLOW", "allowlist")
        self.banned = _compile(list(banned), "BANNED", "banned")
        self.max_hold = max_hold

    def detector_scores(self, texts: list[str]) -> list[float]:
        """Max over sentences and 2-sentence windows of P(injection) per text; 0 without a detector."""
        if self.detector is None or not texts:
            return [0.0] * len(texts)
        return [float(np.max(self.detector.score_vectors(vecs, segs)))
                for segs, vecs in segment_vectors(texts, self.embedder)]

    def scan(self, texts: list[str], placeholders: Placeholders | None = None, *, detector: bool = True
             ) -> list[TextScan]:
        """Injection and PII findings for each text, with no policy applied.

        `placeholders` numbers PII across all texts (one conversation); without it each text has its own.
        `detector=False` leaves the learned detector out (rules and PII only; the cheap part).
        """
        pii_spans, scrubbed = [], []
        for t in texts:
            spans = resolve(candidates(t, (*PATTERNS, *self.allow)), _priority)
            pii_spans.append(spans)
            # allowlisted text is not judged: blank it out (same length, so offsets stay)
            allowed = [s for s in spans if s.type == "ALLOW"]
            for s in allowed:
                t = t[:s.start] + " " * (s.end - s.start) + t[s.end:]
            scrubbed.append(t)
        det = self.detector_scores(scrubbed) if detector else [0.0] * len(texts)
        out = []
        for t, spans, d, clean in zip(texts, pii_spans, det, scrubbed):
            rules = rule_hits(clean)
            score = max(d, 1.0 if rules else 0.0)
            names = Placeholders() if placeholders is None else placeholders
            out.append(TextScan(score >= self.threshold, score, d, rules,
                                [s for s in spans if s.type != "ALLOW"], _replace(t, spans, names), clean))
        return out

    def check_input(self, messages: str | list[dict], placeholders: Placeholders | None = None, *,
                    detector: bool = True) -> GuardResult:
        """Judge a prompt or chat messages and apply the policy; raises ContentFilteredError to block.

        System messages are the deployment's own and are not judged. Pass the conversation's
        `placeholders` to keep numbering stable across turns. `detector=False` checks the rules and
        PII only, so the redacted messages are known at once; `finish_input` then runs the detector
        (the redaction never depends on it).
        """
        placeholders = Placeholders() if placeholders is None else placeholders
        if isinstance(messages, str):
            where, texts = ["the prompt"], [messages]
        else:
            where, texts, refs = [], [], []
            for i, m in enumerate(messages):
                if m.get("role") == "system":
                    continue
                content = m.get("content")
                parts = [(None, content)] if isinstance(content, str) else [
                    (j, p.get("text")) for j, p in enumerate(content or []) if isinstance(p, dict)
                    and p.get("type") == "text" and isinstance(p.get("text"), str)]
                for j, text in parts:
                    where.append(f"message {i + 1}")  # counted as a person counts the conversation's turns
                    texts.append(text)
                    refs.append((i, j))
        scans = self.scan(texts, placeholders, detector=detector)
        injection = any(s.injection for s in scans)
        found = []
        for w, s in zip(where, scans):
            if s.injection:
                why = (f"it matches the rule{'s' * (len(s.rules) > 1)} {', '.join(s.rules)}" if s.rules else
                       f"detector score {s.detector_score:.2f} over the threshold {self.threshold:.2f}")
                found.append(f"prompt injection in {w} ({why})")
            if s.pii:
                found.append(f"personal data in {w} ({', '.join(sorted({p.type for p in s.pii}))})")
        reason = "; ".join(found)
        if self.policy == "block" and found or self.policy == "redact" and injection:
            raise ContentFilteredError(f"the request was blocked by the guard: {reason}. Remove it and retry")
        if self.policy == "log" or not found:
            redacted = messages
            action = "logged" if found else "allowed"
        else:
            action = "redacted"
            if isinstance(messages, str):
                redacted = scans[0].redacted
            else:
                redacted = copy.deepcopy(messages)
                for (i, j), s in zip(refs, scans):
                    if j is None:
                        redacted[i]["content"] = s.redacted
                    else:
                        redacted[i]["content"][j]["text"] = s.redacted
        return GuardResult(injection, max((s.score for s in scans), default=0.0),
                           sorted({r for s in scans for r in s.rules}), scans, redacted, action, reason,
                           placeholders, where, detector_pending=not detector and self.detector is not None)

    def finish_input(self, result: GuardResult) -> GuardResult:
        """The detector's half of a `check_input(..., detector=False)`: raises ContentFilteredError when
        it finds an injection the policy refuses, else returns the result with its scores filled in."""
        if not result.detector_pending:
            return result
        scores = self.detector_scores([s.judged for s in result.scans])
        scans = [replace(s, detector_score=d, score=max(s.score, d), injection=s.injection or d >= self.threshold)
                 for s, d in zip(result.scans, scores)]
        found = [f"prompt injection in {w} (detector score {d:.2f} over the threshold {self.threshold:.2f})"
                 for w, s, d in zip(result.where, result.scans, scores) if d >= self.threshold and not s.injection]
        out = replace(result, scans=scans, score=max((s.score for s in scans), default=0.0),
                      injection=any(s.injection for s in scans), detector_pending=False)
        if not found:
            return out
        reason = "; ".join([*found, *([result.reason] if result.reason else [])])
        if self.policy != "log":
            raise ContentFilteredError(f"the request was blocked by the guard: {reason}. Remove it and retry")
        return replace(out, action="logged", reason=reason)

    def output_filter(self, placeholders: Placeholders | None = None) -> StreamFilter:
        """A filter for one response; pass the request's placeholders so numbering matches the input."""
        return StreamFilter([*self.banned, *self.allow, *PATTERNS],
                            Placeholders() if placeholders is None else placeholders,
                            redact=self.policy != "log", max_hold=self.max_hold)


"""Prompt-injection detection: hand-written rules plus a learned detector over sentence embeddings.

Both look at several views of the input, because attackers hide the words the rules look for:
NFKC-normalised with zero-width characters removed, leetspeak words mapped back to letters, letters
spaced apart joined again, and base64 / hex payloads decoded. The detector is a logistic
regression over the embedder's vectors, scored sentence by sentence (and on windows of two
sentences), taking the maximum, so one attack sentence inside a long benign document still stands
out. Each sentence's vector is read in context: one forward over the text, pooled over the
sentence's tokens (`segment_vectors`), not one forward per sentence and per window. Besides the
embedding, the regression sees TF-IDF weights of character 1-4-grams within words (which works for
Chinese too) and of word 1-2-grams (`NgramVectorizer`): they keep the exact wording that an embedding
blurs, and the English-only embedder has little to say about Chinese. The rules skip quoted text (an
attack in quotes is mostly being asked about); the detector still reads it.
`jobs/guard.py` trains it and writes the weights to `assets/injection_detector.json`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genforge.common.errors import ConfigError

DETECTOR_PATH = Path(__file__).parent / "assets" / "injection_detector.json"

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064"
                                     "\ufeff\u00ad\u180e\u034f"))
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s",
                       "!": "i", "|": "l", "+": "t"})
# A leet word mixes letters with the digits/symbols above ("1gn0r3", "4ll"); a plain number ("343",
# "2024") or punctuation is left as it is, so ordinary text with numbers gets no second view to embed.
_LEET_WORD = re.compile(r"(?=[A-Za-z0-9@$!|+]*[A-Za-z])(?=[A-Za-z0-9@$!|+]*[013457@$!|+])[A-Za-z0-9@$!|+]*[A-Za-z0-9@$]")
_SPACED = re.compile(r"\b(?:[A-Za-z][ ._*\-]){3,}[A-Za-z]\b")
_B64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_HEX = re.compile(r"(?:\\x[0-9a-fA-F]{2}){6,}|(?:[0-9a-fA-F]{2}[ :]?){8,}")
# Quoted text: an attack in quotes is mostly asked about ("a regex for 'ignore previous instructions'"); in
# leave-one-source-out the rules flagged 15 benign rows through a quotation, and 7 quoted attacks, all also
# judged by the detector. A single quote opens only after a non-letter, so "don't ... I'm" is no quotation.
_QUOTED = re.compile(r"\"[^\"\n]{2,300}\"|“[^”\n]{2,300}”|「[^」\n]{2,300}」|『[^』\n]{2,300}』|‘[^’\n]{2,300}’"
                     r"|(?<!\w)'[^'\n]{2,300}?'(?!\w)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")

# Each rule needs an imperative aimed at the model's instructions, not only a trigger word:
# "ignore the noise in this photo" or "what is a system prompt?" must stay clean.
_GAP = r"[^.!?;\n。！？；]{0,40}?"  # within one clause
# between "your"/"previous" and the noun only words that qualify the model's own instructions: "ignore safety
# instructions at work" or "disregard the previous homework instructions" are no attacks
_QUALIFIED = (r"(?:[\s'\",]+(?:the|of|your|my|these|those|all|any|every|prior|previous|preceding|above|earlier"
              r"|former|original|initial|system|safety|content|current|given|existing|hidden|core|default|set|and"
              r"|or|(?:developer|operator|provider|company)(?:'s|s')?))*[\s'\",]+")
_MODS = r"(?:(?:full|entire|exact|complete|original|initial|hidden|secret|internal|confidential|verbatim)\s+)*"
_NOUNS = (r"(?:instructions?|prompts?|rules|directives?|guidelines|guardrails|constraints|programming|polic(?:y|ies)"
          r"|restrictions|directions|safety settings|filters|content polic(?:y|ies)|system prompt)")
_RULES_EN = {
    "ignore_instructions":
        r"\b(?:ignore|disregard|forget|skip|bypass|override|neglect|abandon|discard|drop)\b" + _GAP +
        r"\b(?:previous|prior|preceding|above|earlier|former|original|initial|all|any|every|your|these|those"
        r"|system|developer)\b" + _QUALIFIED + rf"{_NOUNS}\b"
        r"|\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:prior|previous|earlier|preceding)\s+context\b",
    # "the rules you were set up with": the model's own configuration, named without "previous" or "your"
    "ignore_given_instructions":
        r"\b(?:ignore|disregard|forget|bypass|override)\b" + _GAP + rf"\b{_NOUNS}\s+you\s+(?:were|have been)\s+"
        r"(?:given|set up with|configured with|told)\b",
    "instructions_void":
        rf"\b(?:your|all)\s+(?:(?:previous|prior|earlier|preceding|original|initial)\s+)?{_NOUNS}\s+"
        r"(?:no longer apply|do not apply|don't apply|(?:are|were|have been|has been|is)\s+(?:now\s+)?"
        r"(?:updated|cancell?ed|void|suspended|disabled|deleted))\b"
        rf"|\b(?:previous|prior|earlier|preceding)\s+{_NOUNS}\s+(?:are|were|have been)\s+(?:void|cancell?ed)\b",
    "stop_obeying":
        r"\b(?:don't|do not|no longer|needn't)\s+(?:have to|need to)?\s*(?:obey|follow|comply with|adhere to)\s+"
        rf"(?:your|the|any)\s+{_NOUNS}",
    "disable_safety":
        rf"\b(?:turn(?:ing)? off|disabl(?:e|ing)|switch(?:ing)? off|remov(?:e|ing))\s+(?:all\s+)?your\s+{_NOUNS}",
    "filterless_mode":
        r"\b(?:developer|debug|god|jailbreak|dan|unrestricted) mode\b[^.!?\n]{0,50}?\b(?:no (?:restrictions|limits"
        r"|filters|rules)|(?:safety )?filters? (?:are |is )?off|without (?:any |your )?(?:usual )?(?:rules|restrictions"
        r"|filters|guidelines|polic|content polic)|ignores? (?:all )?(?:content )?polic)"
        r"|\byou(?: are|'re) (?:now )?in (?:developer|debug|god|jailbreak) mode\b",
    "reveal_prompt":
        r"\b(?:reveal|show|print|repeat|output|display|leak|dump|expose|disclose|recite|spell out|write out"
        r"|tell me|give me|share|copy|paste)\b" + _GAP + r"\b(?:your\s+" + _MODS + r"(?:initial|original|system"
        # "the initial instructions for setting up the camera" are a manual's, not the model's
        r"|hidden|secret|internal|developer|pre-?)|(?:the|its)\s+" + _MODS + r"(?:system|hidden|secret|internal"
        r"|developer|pre-?))\s*(?:prompt|instructions?|message|rules|configuration)"
        r"|\b(?:repeat|print|output|copy)\b[^.!?\n]{0,20}\b(?:everything|all|the (?:text|words|content))\s+"
        r"(?:above|before this|so far)\b"
        r"|\bwhat (?:were|are) your (?:initial|original|system|hidden|secret) (?:instructions|prompt|rules)"
        r"|\b(?:text|wording|contents?) of your (?:instructions|system (?:prompt|message)|prompt|rules)\b"
        r"|\bwhat(?:'s| is) (?:written )?in your (?:system (?:prompt|message)|instructions|prompt)\b"
        r"|\b(?:confidential|secret|hidden|internal) (?:instructions|rules|prompt) you (?:were|have been) given\b",
    "persona_jailbreak":
        r"\b(?:you are now|you're now|from now on,? you|act as|pretend (?:to be|you are)|role-?play as"
        r"|you will (?:now )?(?:be|act as)|simulate|become)\b[^.!?\n。！？]{0,60}?"
        r"\b(?:dan|do anything now|jailbr(?:oken|eak)|developer mode|dev mode|god mode|evil|unfiltered"
        r"|uncensored|unrestricted|amoral|no (?:rules|restrictions|limits|filters|guidelines|morals|ethics)"
        r"|without (?:any )?(?:rules|restrictions|limits|filters|guidelines|morals|ethics|censorship)"
        r"|not bound by|free (?:from|of) (?:all |any )?(?:rules|restrictions|guidelines|policies))"
        # a named persona with the model's limits taken away: "You are Zeta. Zeta ... has no filters"
        r"|\b(?:you are|you're|pretend to be|act as|play|respond as|become|take on)\b[^.!?\n。！？]{0,60}?"
        r"\b(?:no (?:filters|morals|ethics|directions|policies)|without (?:any )?(?:ethics|morals|filters|safety "
        r"guidelines)|ignores all|freed from (?:all|every)|bound by no|free of all|doesn't care about|jailbroken"
        r"|never refuses|does anything)",
    "jailbreak_mode":
        r"\bdo anything now\b|\b(?:developer|dev|god|jailbreak|unrestricted|dan) mode\b[^.!?\n]{0,30}?"
        r"\b(?:enabled|activated|engaged|unlocked)\b|\b(?:enable|activate|enter|switch to|unlock)\b"
        r"[^.!?\n]{0,10}\b(?:dan|jailbreak|god|unrestricted) mode\b",
    "fake_authority":
        r"\b(?:system|admin|administrator|developer|root)\s+(?:override|update|instructions?|command|notice)"
        r"\s*:|\b(?:real|actual|true|hidden) (?:instructions?|system prompt|rules|task)\s*:|\bnew (?:system prompt|task)\s*:|\bnew (?:instructions?|rules)\s*:(?=[^.\n]{0,80}\b(?:you|your|reply|respond"
        r"|tell|print|reveal|output|say|ignore|list|answer|write)\b)"
        r"|<\|?(?:im_start|system)\|?>|\[/?(?:inst|system)\]|#{2,}\s*system\s*:|\b(?:admin|administrator|root)"
        r" override\b|\b(?:instructions?|message|note) (?:to|for) (?:the |any |all )?(?:ai|assistant|chatbot|language"
        r" model|llm)s?\b(?!\s+(?:manager|coach|director|editor|teacher))",
    "no_refusal":
        r"\b(?:do not|don't|never|must not|mustn't|cannot|can't)\s+(?:refuse|decline|reject)[sd]?\b"
        # "do not refuse delivery", "never refuse a chance": a refusal of something else
        r"(?!\s+(?:a|an|the|delivery|payment|service|treatment|help from)\b)"
        r"|\b(?:disclaimers?|warnings?) or refusals?\b",
    "ai_reader":
        r"\b(?:ai|assistant|language model|llm|chatbot)s?(?:\s+(?:agents?|readers?|models?))?\s+(?:reading|"
        r"processing|summari[sz]ing)\s+this\b",
}
_ZGAP = r"[^。！？\n]{0,14}?"
_ZH_REVEAL = "泄露|泄漏|显示|输出|打印|告诉我|透露|重复|展示|给我看|说出|公开|发给我|复述"
_ZH_PROMPT = "系统提示|系统指令|初始指令|系统消息|隐藏指令|提示词|系统设定|初始设定|原始指令|内部指令|预设指令"
_RULES_ZH = {
    "zh_ignore_instructions":
        r"(?:忽略|忽视|无视|忘记|忘掉|不要理会|别管|不要管|跳过|抛开|放弃|绕过|不要遵守|不再遵守)" + _ZGAP +
        r"(?:之前|以前|先前|上面|上述|前面|此前|原来|原先|原有|所有|一切|全部|你的|系统|开发者|安全|任何)" + _ZGAP +
        r"(?:指令|指示|提示|规则|要求|设定|命令|约束|限制|规定|准则|政策)",
    # both word orders: "输出你的系统提示词" and the 把-construction "把你的系统提示词输出给我"
    "zh_reveal_prompt":
        rf"(?<!不)(?:{_ZH_REVEAL})(?!了){_ZGAP}(?:{_ZH_PROMPT})|把{_ZGAP}(?:{_ZH_PROMPT}){_ZGAP}(?:{_ZH_REVEAL})"
        rf"|你的(?:{_ZH_PROMPT})是什么",
    "zh_instructions_void":
        r"(?:之前|原来|原有|先前|你的)" + _ZGAP + r"(?:指令|规则|设定|限制|系统提示|准则)" +
        r"(?:已经|已|都)?(?:失效|无效|不适用|不再适用|被取消)",
    "zh_disable_safety": r"(?:关闭|解除|移除|禁用|取消)你的" + _ZGAP + r"(?:限制|规则|设定|过滤|安全|系统提示)",
    "zh_fake_authority": r"【系统】|(?:管理员|开发者)(?:指令|命令)[：:]|新指令[：:]",
    "zh_persona_jailbreak":
        r"(?:你现在是|现在你是|你现在扮演|扮演|假装你?是|从现在开始|从现在起|进入|切换到|开启|启用|激活)" + _ZGAP +
        r"(?:没有任何限制|不受任何限制|不受限制|不受约束|无限制|没有限制|没有道德|不受道德|不讲道德|dan"
        r"|越狱|上帝模式|邪恶|无审查|不受审查|不受任何.{0,4}约束)"
        # a phone's 开发者模式 is switched on every day: only the model being told it is in one counts
        r"|(?:你现在是|现在你是|你现在扮演|扮演|假装你?是|从现在开始|从现在起|你(?:现在)?已?经?(?:进入|切换到|开启))" + _ZGAP
        + "开发者模式"
        r"|AI[^。！？\n]{0,6}(?:没有任何限制|不受任何限制)",
    # "(规定)不能拒绝" describes a rule; aimed at the model ("你不能拒绝") it is an order
    "zh_no_refusal": r"(?:不要|不许|禁止|不准)(?:拒绝|说不)|(?:你|绝对|都)(?:不能|不得)(?:拒绝|说不)",
}
RULES: dict[str, re.Pattern] = {k: re.compile(v, re.IGNORECASE) for k, v in {**_RULES_EN, **_RULES_ZH}.items()}


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)


def _decode_payloads(text: str) -> list[str]:
    """Base64 and hex runs that decode to readable text: an attack can arrive encoded."""
    out = []
    for m in _B64.finditer(text):
        s = m.group()
        try:
            raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        out.append(raw)
    for m in _HEX.finditer(text):
        try:
            out.append(bytes.fromhex(re.sub(r"\\x|[ :]", "", m.group())))
        except ValueError:
            continue
    texts = []
    for raw in out:
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if s and sum(c.isprintable() or c.isspace() for c in s) / len(s) > 0.95 and any(c.isalpha() for c in s):
            texts.append(normalise(s))
    return texts


def views(text: str) -> list[str]:
    """The normalised text plus every de-obfuscated reading of it that differs."""
    base = normalise(text)
    out = [base]
    for v in (_LEET_WORD.sub(lambda m: m.group().translate(_LEET), base), _SPACED.sub(lambda m: re.sub(r"[ ._*\-]", "", m.group()), base),
              *_decode_payloads(base)):
        if v not in out:
            out.append(v)
    return out


def rule_hits(text: str) -> list[str]:
    """Names of the rules that match any view of `text` outside quotations, in rule order."""
    vs = [_QUOTED.sub(lambda m: " " * len(m.group()), v) for v in views(text)]
    return [name for name, rx in RULES.items() if any(rx.search(v) for v in vs)]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and len(s.strip()) >= 3]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of `sentences(text)`, in order."""
    out, pos = [], 0
    for part in _SENTENCE_END.split(text):
        start = text.find(part, pos) if part else pos
        pos = start + len(part)
        stripped = part.strip()
        if part and len(stripped) >= 3:
            a = start + (len(part) - len(part.lstrip()))
            out.append((a, a + len(stripped)))
    return out


def segment_spans(text: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """`segments` as spans: for each view of `text`, its sentences and windows of two neighbouring
    sentences (a window runs from the first's start to the second's end)."""
    out = []
    for v in views(text):
        ss = sentence_spans(v)
        spans = ss + [(a[0], b[1]) for a, b in zip(ss, ss[1:])]
        out.append((v, spans or [(0, len(v))]))
    return out


def segment_vectors(texts: list[str], embedder: Any) -> list[tuple[list[str], np.ndarray]]:
    """For each text, its segments (`segment_spans`) and their vectors, each read in the context of its
    view: one forward per view (`embed_spans`), not one per sentence and per pair of sentences. The
    detector is trained on vectors made this way (jobs/guard.py), so training and serving agree."""
    per_text = [segment_spans(t) for t in texts]
    _, parts = embedder.embed_spans([v for vs in per_text for v, _ in vs], [sp for vs in per_text for _, sp in vs])
    out, i = [], 0
    for vs in per_text:
        out.append(([v[a:b] for v, sp in vs for a, b in sp], np.concatenate(parts[i:i + len(vs)])))
        i += len(vs)
    return out


class NgramVectorizer:
    """The detector's lexical features: TF-IDF of character 1-4-grams within words (for Chinese, single
    characters and runs of them) next to TF-IDF of word 1-2-grams. Training fits it; loading rebuilds it
    from the saved vocabularies and weights, so both agree. Chosen by leave-one-source-out cross-validation
    (benchmarks/guard_loso.py) over char 2-5-grams alone: pooled recall at 4% false positives 0.79 -> 0.89."""

    def __init__(self, vocabs: tuple[list[str], list[str]] | None = None,
                 idfs: tuple[np.ndarray, np.ndarray] | None = None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        kw: dict[str, Any] = {"min_df": 2, "sublinear_tf": True, "dtype": np.float32}
        char, word = vocabs if vocabs is not None else (None, None)
        self.parts = (TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), vocabulary=char, **kw),
                      TfidfVectorizer(analyzer="word", ngram_range=(1, 2), vocabulary=word, **kw))
        for part, idf in zip(self.parts, idfs or ()):
            part.idf_ = idf

    @staticmethod
    def _unquoted(texts: list[str]) -> list[str]:
        # A quotation counts as one token: "a regex for 'ignore previous instructions'" is then told from an
        # attack by its own words, while the embedding still reads the quoted ones. Leave-one-source-out recall
        # at 4% false positives, mean over sources: 0.80 -> 0.86 (pooled 0.89 -> 0.88).
        return [_QUOTED.sub(" quotedtext ", t) for t in texts]

    def fit(self, texts: list[str]) -> NgramVectorizer:
        for part in self.parts:
            part.fit(self._unquoted(texts))
        return self

    def transform(self, texts: list[str]) -> Any:
        from scipy import sparse

        return sparse.hstack([part.transform(self._unquoted(texts)) for part in self.parts]).tocsr()

    @property
    def vocabs(self) -> tuple[list[str], list[str]]:
        char, word = (list(map(str, part.get_feature_names_out())) for part in self.parts)
        return char, word

    @property
    def idfs(self) -> tuple[np.ndarray, np.ndarray]:
        char, word = (part.idf_.astype(np.float32) for part in self.parts)
        return char, word


@dataclass
class Ngrams:
    """The n-gram part of the detector: vocabularies, inverse document frequencies and regression weights
    (character n-grams' first, then words')."""

    vocab: list[str]
    idf: np.ndarray
    word_vocab: list[str]
    word_idf: np.ndarray
    coef: np.ndarray

    def __post_init__(self) -> None:
        if len(self.coef) != len(self.vocab) + len(self.word_vocab):
            raise ValueError(f"{len(self.coef)} n-gram weights for {len(self.vocab) + len(self.word_vocab)} n-grams")
        self._vec = NgramVectorizer((self.vocab, self.word_vocab), (self.idf, self.word_idf))

    def logits(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._vec.transform(texts) @ self.coef, dtype=np.float64)

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "idf": [round(float(v), 4) for v in self.idf], "word_vocab": self.word_vocab,
                "word_idf": [round(float(v), 4) for v in self.word_idf],
                "coef": [float(f"{c:.5g}") for c in self.coef]}


@dataclass
class InjectionDetector:
    """Logistic regression over sentence embeddings (`coef`) and n-grams (`ngrams`, optional):
    `score_vectors` gives P(injection) per segment."""

    coef: np.ndarray
    intercept: float
    threshold: float
    embedder_name: str
    embedder_version: str
    training_hash: str
    ngrams: Ngrams | None = None

    def score_vectors(self, x: np.ndarray, texts: list[str]) -> np.ndarray:
        """P(injection) of each text, given its embedding (a row of `x`)."""
        z = x @ self.coef + self.intercept
        if self.ngrams is not None:
            z = z + self.ngrams.logits(texts)
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return {"coef": [round(float(c), 7) for c in self.coef], "intercept": float(self.intercept),
                "threshold": float(self.threshold), "embedder_name": self.embedder_name,
                "embedder_version": self.embedder_version, "training_hash": self.training_hash,
                "ngrams": self.ngrams.to_dict() if self.ngrams is not None else None}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # compact: the n-gram vocabulary is tens of thousands of entries
            json.dump(self.to_dict(), f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; this is a package file
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path | None = None) -> InjectionDetector:
        path = Path(path) if path is not None else DETECTOR_PATH
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            ng = d.get("ngrams")
            ngrams = None if ng is None else Ngrams(
                [str(v) for v in ng["vocab"]], np.asarray(ng["idf"], dtype=np.float32),
                [str(v) for v in ng["word_vocab"]], np.asarray(ng["word_idf"], dtype=np.float32),
                np.asarray(ng["coef"], dtype=np.float32))
            return cls(np.asarray(d["coef"], dtype=np.float32), float(d["intercept"]), float(d["threshold"]),
                       str(d["embedder_name"]), str(d["embedder_version"]), str(d["training_hash"]), ngrams)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"injection detector {path} is missing or unreadable ({e}); retrain it with "
                              "genforge.jobs.guard.train_injection_detector", param="guard") from e


def rows_hash(rows: list[dict]) -> str:
    """Content hash of a labelled set, recorded with the weights trained on it."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["text"], r["label"]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]

"""PII detection and redaction: email, phone, credit card, IBAN, IPv4/IPv6, Chinese resident ID, US SSN.

Each type is a regex that finds candidates plus a validator (Luhn, mod-97, ISO 7064 MOD 11-2,
`ipaddress`, date and range checks), so a number that only looks like PII is left alone. The
patterns use the `regex` module because the streaming output filter needs its partial matching to
know which trailing characters could still grow into a match (`serve/guard.py`).

Lookarounds use ASCII classes, not `\\w`: in Python `\\w` matches Chinese characters, and
"邮箱zhang@example.com" must still find the address.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import regex

# Candidate patterns resolve overlaps in this order: a value that passes a strong checksum wins
# over a weaker reading of the same digits (an 18-digit ID is not also a phone number).
PII_TYPES = ("CN_ID", "CREDIT_CARD", "IBAN", "US_SSN", "EMAIL", "IPV6", "IPV4", "PHONE")


@dataclass(frozen=True)
class Span:
    type: str
    start: int
    end: int
    text: str

    def to_dict(self) -> dict:
        return {"type": self.type, "start": self.start, "end": self.end, "text": self.text}


@dataclass(frozen=True)
class Pattern:
    """One candidate regex. `validate(matched) -> (start, end) | None`: the valid part, relative to the match."""

    type: str
    regex: regex.Pattern
    validate: Callable[[str], tuple[int, int] | None]
    priority: int


# ---------------------------------------------------------------- validators

def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix_ok(d: str) -> bool:
    # Issuer ranges of the card networks (Visa, Mastercard incl. 2-series, Amex, Diners, JCB,
    # Discover, UnionPay): an order number that happens to pass Luhn rarely starts like a card.
    return (d[0] == "4" or d[:2] in {"34", "37", "36", "38", "35", "62", "65"} or "51" <= d[:2] <= "55"
            or "2221" <= d[:4] <= "2720" or "300" <= d[:3] <= "305" or d[:4] == "6011" or "644" <= d[:3] <= "649")


# Card numbers are 13-16 or 19 digits; an 18-digit run is far more often an ID or an order number.
_CARD_LENGTHS = {13, 14, 15, 16, 19}


def _credit_card(s: str) -> tuple[int, int] | None:
    d = "".join(c for c in s if c.isdigit())
    return (0, len(s)) if len(d) in _CARD_LENGTHS and _card_prefix_ok(d) and luhn_ok(d) else None


# Registered IBAN lengths (ISO 13616 registry); other two-letter prefixes must still be 15-34 long.
_IBAN_LEN = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    if not (15 <= len(s) <= 34) or _IBAN_LEN.get(s[:2], len(s)) != len(s):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _longest_valid_prefix(s: str, ok: Callable[[str], bool]) -> tuple[int, int] | None:
    """The match may have swallowed a trailing group of the next word or number: back off group by group."""
    ends = [len(s)] + [i for i in range(len(s) - 1, 0, -1) if s[i] in " .-" and s[i - 1] not in " .-"]
    for end in ends:
        if ok(s[:end]):
            return 0, end
    return None


def _iban(s: str) -> tuple[int, int] | None:
    return _longest_valid_prefix(s, iban_ok)


def _intl_phone(s: str) -> tuple[int, int] | None:
    return _longest_valid_prefix(s, lambda p: 8 <= sum(c.isdigit() for c in p) <= 15)


def _always(s: str) -> tuple[int, int] | None:
    return 0, len(s)


def _ip(s: str) -> tuple[int, int] | None:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return None
    return 0, len(s)


def _ipv6(s: str) -> tuple[int, int] | None:
    # "::" and "a::b" are valid addresses but in text they are C++ scopes; real ones carry digits
    return _ip(s) if any(c.isdigit() for c in s) else None


_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_PROVINCES = {11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
                 50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82}


def cn_id_ok(s: str) -> bool:
    s = s.upper()
    if len(s) != 18 or not s[:17].isdigit() or int(s[:2]) not in _CN_PROVINCES:
        return False
    check = "10X98765432"[sum(int(c) * w for c, w in zip(s[:17], _CN_WEIGHTS)) % 11]
    if s[17] != check:
        return False
    try:
        born = datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    return datetime.date(1900, 1, 1) <= born <= datetime.date.today()


def _cn_id(s: str) -> tuple[int, int] | None:
    return (0, len(s)) if cn_id_ok(s) else None


# ---------------------------------------------------------------- patterns

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_H = r"[0-9A-Fa-f]{1,4}"


def _p(t: str, pattern: str, validate: Callable[[str], tuple[int, int] | None]) -> Pattern:
    return Pattern(t, regex.compile(pattern, regex.V0), validate, PII_TYPES.index(t))


PATTERNS: tuple[Pattern, ...] = (
    _p("CN_ID", r"(?<![A-Za-z0-9])\d{17}[\dXx](?![A-Za-z0-9])", _cn_id),
    _p("CREDIT_CARD", r"(?<![A-Za-z0-9-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?"
                      r"|\d{4}([ -])\d{6}\2\d{4,5})(?![\d-])", _credit_card),
    _p("IBAN", r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}(?![A-Za-z0-9])", _iban),
    _p("US_SSN", r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])", _always),
    _p("EMAIL", rf"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@{_LABEL}(?:\.{_LABEL})*\.[A-Za-z]{{2,}}"
                r"(?![A-Za-z0-9-])", _always),
    _p("IPV6", rf"(?<![A-Za-z0-9:.])(?:(?:{_H})?:){{2,7}}(?:\d{{1,3}}(?:\.\d{{1,3}}){{3}}|{_H})?"
               r"(?![A-Za-z0-9:]|\.\d)",
       _ipv6),
    _p("IPV4", r"(?<![A-Za-z0-9_.])(?:\d{1,3}\.){3}\d{1,3}(?![\d])(?!\.\d)", _ip),
    # Chinese mobile, with or without +86 / 0086, never part of a longer (grouped) digit run or a code
    _p("PHONE", r"(?<![A-Za-z0-9+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d|[ -]\d)", _always),
    # international: + country code and 8-15 digits in groups
    _p("PHONE", r"(?<![A-Za-z0-9+])\+[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}(?!\d)", _intl_phone),
    # North American national format needs its separators, so bare digit runs stay order numbers
    _p("PHONE", r"(?<![A-Za-z0-9+-])(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[.-])\d{3}[.-]\d{4}(?![\d-])", _always),
)


def candidates(text: str, patterns: Iterable[Pattern] = PATTERNS, pos: int = 0) -> list[Span]:
    """Every validated candidate of every pattern from `pos` on, overlapping ones included."""
    out: list[Span] = []
    for p in patterns:
        for m in p.regex.finditer(text, pos):
            valid = p.validate(m.group())
            if valid is not None:
                s, e = m.start() + valid[0], m.start() + valid[1]
                out.append(Span(p.type, s, e, text[s:e]))
    return out


def resolve(spans: Iterable[Span], priority: Callable[[Span], int]) -> list[Span]:
    """Non-overlapping spans in text order: stronger type first, then the longer span."""
    chosen: list[Span] = []
    for sp in sorted(spans, key=lambda s: (priority(s), s.start - s.end, s.start)):
        if all(sp.end <= c.start or sp.start >= c.end for c in chosen):
            chosen.append(sp)
    return sorted(chosen, key=lambda s: s.start)


def _pii_priority(s: Span) -> int:
    return PII_TYPES.index(s.type)


def find_pii(text: str) -> list[Span]:
    return resolve(candidates(text), _pii_priority)


def canonical(type_: str, value: str) -> str:
    """What makes two mentions the same value: "+86 138 1234 5678" and "13812345678" are one phone."""
    if type_ in ("PHONE", "CREDIT_CARD", "US_SSN"):
        d = "".join(c for c in value if c.isdigit())
        if type_ == "PHONE":
            d = d[2:] if d.startswith("00") else d
            d = d[2:] if len(d) == 13 and d.startswith("86") else d
        return d
    if type_ in ("IPV4", "IPV6"):
        return str(ipaddress.ip_address(value))
    if type_ == "IBAN":
        return value.replace(" ", "").upper()
    return value.lower() if type_ == "EMAIL" else value.upper()


@dataclass
class Placeholders:
    """Typed numbered placeholders that stay stable across a conversation or a stream."""

    _by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def get(self, type_: str, value: str) -> str:
        key = (type_, canonical(type_, value))
        if key not in self._by_value:
            self._counts[type_] = self._counts.get(type_, 0) + 1
            self._by_value[key] = f"[{type_}_{self._counts[type_]}]"
        return self._by_value[key]


def redact(text: str, spans: list[Span] | None = None, placeholders: Placeholders | None = None) -> str:
    """`text` with each span replaced by its placeholder; spans default to `find_pii(text)`."""
    spans = find_pii(text) if spans is None else sorted(spans, key=lambda s: s.start)
    placeholders = Placeholders() if placeholders is None else placeholders
    out, last = [], 0
    for sp in spans:
        out.append(text[last:sp.start])
        out.append(placeholders.get(sp.type, sp.text))
        last = sp.end
    out.append(text[last:])
    return "".join(out)

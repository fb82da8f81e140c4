"""PII detection and redaction: every type, checksum-valid and -invalid values, placeholder numbering."""

import pytest

from genforge.data.pii import Placeholders, cn_id_ok, find_pii, iban_ok, luhn_ok, redact


def found(text: str) -> list[tuple[str, str]]:
    return [(s.type, s.text) for s in find_pii(text)]


@pytest.mark.parametrize("text,kind,value", [
    ("mail zhang.san@example.com.cn now", "EMAIL", "zhang.san@example.com.cn"),
    ("邮箱li@qq.com，谢谢", "EMAIL", "li@qq.com"),
    ("call 13812345678 today", "PHONE", "13812345678"),
    ("电话+86 138 1234 5678。", "PHONE", "+86 138 1234 5678"),
    ("or 0086-15012345678.", "PHONE", "0086-15012345678"),
    ("London +44 20 7946 0958 office", "PHONE", "+44 20 7946 0958"),
    ("US +1 (415) 555-0132 desk", "PHONE", "+1 (415) 555-0132"),
    ("NY (212) 555-0199 desk", "PHONE", "(212) 555-0199"),
    ("card 4111 1111 1111 1111 ok", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("amex 3782-822463-10005 ok", "CREDIT_CARD", "3782-822463-10005"),
    ("mc 5500005555555559.", "CREDIT_CARD", "5500005555555559"),
    ("IBAN DE89 3704 0044 0532 0130 00 and", "IBAN", "DE89 3704 0044 0532 0130 00"),
    ("to GB82WEST12345698765432.", "IBAN", "GB82WEST12345698765432"),
    ("host 192.168.1.1, ok", "IPV4", "192.168.1.1"),
    ("v6 2001:db8::8a2e:370:7334 up", "IPV6", "2001:db8::8a2e:370:7334"),
    ("mapped ::ffff:192.0.2.1 up", "IPV6", "::ffff:192.0.2.1"),
    ("身份证11010519491231002X。", "CN_ID", "11010519491231002X"),
    ("ssn 123-45-6789.", "US_SSN", "123-45-6789"),
])
def test_each_type_is_found_with_its_offsets(text, kind, value):
    spans = find_pii(text)
    assert [(s.type, s.text) for s in spans] == [(kind, value)]
    assert text[spans[0].start:spans[0].end] == value


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 declined",               # Luhn fails
    "IBAN DE89 3704 0044 0532 0130 01 typo",            # mod-97 fails
    "id 110105194912310021 wrong check digit",          # MOD 11-2 fails
    "id 110105194913310021 month 13",                   # check digit right, no such birth date
    "ssn 000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000",
    "ip 256.1.1.1 and 1.2.3 and v1.2.3.4",
    "at 12:30:45 in std::vector and a::b",
    "order 213912345678 and 139123456789",              # mobile inside a longer digit run
    "order ORD-2024-004512, PO 4500012345, tracking 1Z4388254225645776",
    "on 2024-03-15, 15.03.2024, 2025年1月8日; version 3.11.4, build 10.0.19045.2965",
    "ISBN 978-3-16-148410-0 costs 12,345.67",
])
def test_near_misses_are_not_pii(text):
    assert found(text) == []


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
    assert not iban_ok("DE89 3704 0044 0532 0130")  # valid-looking but too short for DE
    assert cn_id_ok("11010519491231002X") and cn_id_ok("11010519491231002x")
    assert not cn_id_ok("99010519491231002X")  # no such province


def test_overlapping_readings_resolve_to_the_checked_type():
    # 18 digits that are a valid ID are not also a card or phone
    assert found("号码110105194912310029") == []  # bad check digit, and too long for a phone
    assert found("ID 11010519491231002X, tel 13912345678") == [("CN_ID", "11010519491231002X"),
                                                               ("PHONE", "13912345678")]


def test_placeholders_same_value_same_number_different_values_different_numbers():
    text = ("Write to a@x.com or A@X.com, not b@y.org. Call 13812345678 or +86 138 1234 5678 "
            "or 13900000000.")
    out = redact(text)
    assert out == ("Write to [EMAIL_1] or [EMAIL_1], not [EMAIL_2]. Call [PHONE_1] or [PHONE_1] "
                   "or [PHONE_2].")


def test_placeholders_keep_numbering_across_calls():
    names = Placeholders()
    first = redact("mail a@x.com", placeholders=names)
    second = redact("mail c@z.com and a@x.com, ip 10.0.0.1", placeholders=names)
    assert first == "mail [EMAIL_1]"
    assert second == "mail [EMAIL_2] and [EMAIL_1], ip [IPV4_1]"
    assert redact("mail c@z.com") == "mail [EMAIL_1]"  # a fresh conversation starts again at 1


def test_redact_with_given_spans_only_replaces_those():
    text = "a@x.com 13812345678"
    spans = [s for s in find_pii(text) if s.type == "PHONE"]
    assert redact(text, spans) == "a@x.com [PHONE_1]"

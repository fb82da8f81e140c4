import pytest

from genforge.common.errors import DataError
from genforge.data.clean import Deduper, clean_documents, normalize


def test_normalize_is_nfc_and_trimmed():
    assert normalize("  e\u0301t\u00e9 \n") == "\u00e9t\u00e9"


def test_clean_counts_duplicates_and_filtered():
    docs = ["a doc", "  a doc  ", "e\u0301", "\u00e9", "", "   ", "x" * 50, "other"]
    out = clean_documents(docs, min_chars=1, max_chars=10)
    assert out.docs == ["a doc", "\u00e9", "other"]
    assert out.duplicates_removed == 2  # trimmed copy, decomposed copy
    assert out.filtered == 3  # two empty, one too long


def test_small_pieces():
    seen = Deduper()
    assert [seen.first_time(d) for d in ["b", "a", "b"]] == [True, True, False]
    assert clean_documents(["b", "a", "b"]) == (["b", "a"], 1, 0)
    assert clean_documents(["ab", "abcd", "a"], min_chars=2, max_chars=3) == (["ab"], 0, 2)


def test_bad_limits():
    with pytest.raises(DataError, match="min_chars"):
        clean_documents(["x"], min_chars=-1)
    with pytest.raises(DataError, match="max_chars"):
        clean_documents(["x"], min_chars=5, max_chars=2)

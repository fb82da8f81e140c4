import warnings

import pytest
from transformers import AutoTokenizer

from genforge.common.errors import DataError
from genforge.data.tokenizer import BOS, EOS, PAD, UNK, encode_texts, load_tokenizer, train_tokenizer

CORPUS = ["Hello world, hello tokenizer.", "The quick brown fox jumps over the lazy dog.",
          "def f(x):\n    return x + 1\n", "naïve café — 你好，世界"]
SAMPLES = ["plain ASCII text.", "中文字符和标点。", "emoji 🎉👩‍👩‍👧 and flags 🇯🇵", "  leading spaces\n\nand\ttabs\n",
           "a , b . c ' d", "\n", "never seen: ĳ ß Ω ∑ 𝔘"]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, "byte-bpe", 300)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_bpe_round_trips_any_utf8(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.unk_token_id is None or bpe.unk_token_id not in ids


def test_byte_bpe_saves_in_hf_format(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS, EOS, PAD)
    assert [loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id] == [0, 1, 2]
    assert len(loaded) == 300
    for text in SAMPLES:
        ids = loaded.encode(text)
        assert ids == bpe.encode(text)
        assert loaded.decode(ids) == text
    assert load_tokenizer(tmp_path).encode("hi") == bpe.encode("hi")


def test_encode_adds_no_special_tokens(bpe):
    ids = bpe.encode("hello")
    assert bpe.bos_token_id not in ids and bpe.eos_token_id not in ids
    assert encode_texts(bpe, ["hello", ""]) == [ids, []]


def test_byte_bpe_vocab_limits():
    with pytest.raises(DataError, match="at least 259"):
        train_tokenizer(CORPUS, "byte-bpe", 258)
    with pytest.raises(DataError, match=r"can learn at most \d+ tokens"):
        train_tokenizer(["abab"], "byte-bpe", 1000)


def test_char_round_trip_and_unknown(tmp_path):
    tok = train_tokenizer(["hello world", "  tabs\tand\nnewlines, é"], "char", 100)
    assert tok.unk_token == UNK
    for text in ["hello world", "  wow,\n\tdone é", " "]:
        assert tok.decode(tok.encode(text)) == text
    with pytest.warns(UserWarning, match=r"2 character\(s\).*'Z', '中'"):
        (ids,) = encode_texts(tok, ["heZ中"])
    assert ids[2:] == [tok.unk_token_id] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_texts(tok, ["hello"])  # no warning when every character is known
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.decode(loaded.encode("new\tline\n")) == "new\tline\n"
    assert loaded.encode("Z") == [loaded.unk_token_id]


def test_char_vocab_keeps_most_frequent_characters():
    tok = train_tokenizer(["aaaa bbb cc d"], "char", 4 + 3)
    assert len(tok) == 7
    assert set(tok.get_vocab()) >= {"a", "b", " "}
    assert tok.encode("d") == [tok.unk_token_id]
    with pytest.raises(DataError, match="at least 5"):
        train_tokenizer(["abc"], "char", 4)


def test_unknown_kind():
    with pytest.raises(DataError, match="byte-bpe, char"):
        train_tokenizer(CORPUS, "wordpiece", 100)

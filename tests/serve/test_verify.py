"""The verification stage on hand-picked pairs (not from the pair set), and the pair set's shape."""

from collections import Counter

import pytest

from genforge.serve.cache import PAIRS_FILE, load_pairs
from genforge.serve.verify import Verifier, lexical, similarity

V = Verifier()

SAME = [
    ("How do I rename a file in Linux?", "In Linux, how do I rename a file?"),
    ("Could you kindly explain what a mortgage is?", "whats a mortgage"),
    ("How do I create a new folder on my Mac?", "how do i creat a new foldr on my mac"),
    ("How do I stop my cat from scratching furniture?", "How do I prevent my cat from scratching furniture?"),
    ("When did the Berlin Wall fall?", "The Berlin Wall fell when?"),
    ("台风是怎么形成的？", "台风如何形成？"),
    ("请问怎么注册微信？", "微信怎么注册？"),
]
DIFFERENT = [
    ("entity", "What is the capital of Italy?", "What is the capital of Spain?"),
    ("entity", "How do I install Node on Debian?", "How do I install Node on Arch?"),
    ("number", "What is 12 times 7?", "What is 12 times 8?"),
    ("number", "Give me three ideas for a birthday party.", "Give me five ideas for a birthday party."),
    ("negation", "Which fruits are good for dogs?", "Which fruits are not good for dogs?"),
    ("negation", "Why does my phone charge?", "Why doesn't my phone charge?"),
    ("direction", "How long is the train from Rome to Milan?", "How long is the train from Milan to Rome?"),
    ("direction", "Is gold heavier than lead?", "Is lead heavier than gold?"),
    ("unit", "How many ounces are in a liter?", "How many ounces are in a gallon?"),
    ("time", "What is the weather in Oslo today?", "What is the weather in Oslo tomorrow?"),
    ("number", "Who won the Super Bowl in 2019?", "Who won the Super Bowl in 2021?"),
    ("comparative", "Which ocean is the largest?", "Which ocean is the smallest?"),
    ("comparative", "How do I make the text bigger?", "How do I make the text smaller?"),
    ("zh-entity", "广州的人口是多少？", "深圳的人口是多少？"),
    ("zh-number", "五乘以七等于几？", "五乘以八等于几？"),
    ("zh-negation", "为什么电脑能开机？", "为什么电脑不能开机？"),
    ("zh-direction", "从杭州到南京要多久？", "从南京到杭州要多久？"),
    ("zh-time", "今天杭州天气怎么样？", "明天杭州天气怎么样？"),
    ("zh-comparative", "哪种动物跑得最快？", "哪种动物跑得最慢？"),
    ("zh-unit", "一米等于多少英尺？", "一米等于多少英寸？"),
]


@pytest.mark.parametrize("a,b", SAME)
def test_paraphrases_are_accepted(a, b):
    ok, reason = V.same(a, b, 0.9)
    assert ok, reason


@pytest.mark.parametrize("kind,a,b", DIFFERENT)
def test_near_misses_are_refused_with_a_reason(kind, a, b):
    ok, reason = V.same(a, b, 0.95)
    assert not ok
    word = kind.removeprefix("zh-")
    expected = {"entity": "subject", "comparative": "opposite", "negation": "negated"}.get(word, word)
    assert expected in reason, reason
    assert not V.same(b, a, 0.95)[0]  # symmetric


def test_lexical_rescues_typos_and_chinese_rewording_that_cosine_underscores():
    assert lexical("explain the theroy of relativty", "Explain the theory of relativity.") == 1.0
    assert similarity("为什么天空是蓝色的？", "天空为什么是蓝色的？", 0.5) == 1.0
    assert similarity("what is a dog", "how do planes fly", 0.2) < 0.5


def test_pair_set_shape():
    rows = load_pairs(PAIRS_FILE)
    assert len(rows) >= 240
    assert {r["split"] for r in rows} == {"dev", "test"}
    assert {r["lang"] for r in rows} == {"en", "zh"}
    assert sum(r["lang"] == "zh" for r in rows) >= 40
    by = Counter((r["lang"], r["same"], r["split"]) for r in rows)
    for lang in ("en", "zh"):
        for same in (True, False):
            assert by[lang, same, "dev"] >= 5 and by[lang, same, "test"] >= 5
    cats = {r["category"] for r in rows if not r["same"]}
    assert {"entity", "number", "negation", "direction", "unit", "time", "comparative"} <= cats
    assert len({(r["a"], r["b"]) for r in rows}) == len(rows)
    # stratified: every category is in both splits
    for cat in {r["category"] for r in rows}:
        assert {r["split"] for r in rows if r["category"] == cat} == {"dev", "test"}


def test_unrelated_chinese_questions_are_refused_whatever_the_cosine():
    # the English-only embedder put these two at cosine 0.75: the cache once served one for the other
    ok, reason = V.same("北京到上海的高铁要多长时间？", "世界上最高的山是什么？", 0.7521)
    assert not ok and "little in common" in reason
    assert V.same("为什么天空是蓝色的？", "天空为何呈现蓝色？", 0.8)[0]  # a rewording shares enough characters

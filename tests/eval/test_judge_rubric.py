"""A user's own rubric and score range (eval/judge.py): loading the file, the range the schema and the
validation use, and the rubric in the cache key; against `genforge serve` as the judge (test_judge's
random tiny Llama, which answers in range only because the schema constrains its decoding)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from genforge.common.errors import ConfigError
from genforge.eval.judge import Judge, JudgeConfig, load_rubric
from tests.eval.test_judge import JUDGE_NAME, config, judge_model  # noqa: F401  (judge_model: a fixture)
from tests.serve.conftest import Live, serve_in_thread, tok  # noqa: F401  (tok: a fixture)

FIVE = "Score 1-5. JSON."


class ChatCounter:
    """ASGI wrapper counting chat completion requests as they arrive. genforge serve's own
    http_requests metric counts a request once its response has been sent, so a client reading
    /metrics right after its last answer can see the count one short."""

    def __init__(self, app):
        self.app, self.calls = app, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            self.calls += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def counted_judge(judge_model, tok) -> Iterator[tuple[Live, ChatCounter]]:  # noqa: F811
    """genforge serve as the judge (real uvicorn, real port), with its chat requests counted."""
    from genforge.serve.server import create_app

    counter = ChatCounter(create_app(model=judge_model, tokenizer=tok, served_model_name=JUDGE_NAME))
    with serve_in_thread(counter) as live:
        yield live, counter


def test_load_rubric_strips_the_text_and_names_the_flag_when_the_file_is_missing_or_empty(tmp_path):
    (tmp_path / "r.txt").write_text("\n  Grade 1-5.\n\n", encoding="utf-8")
    assert load_rubric(tmp_path / "r.txt") == "Grade 1-5."
    with pytest.raises(ConfigError, match=r"^--judge-rubric .*nope.txt: no such file") as info:
        load_rubric(tmp_path / "nope.txt")
    assert info.value.param == "judge_rubric"
    (tmp_path / "empty.txt").write_text(" \n\t\n")
    with pytest.raises(ConfigError, match=r"^--judge-pairwise-rubric .*empty.txt is empty") as info:
        load_rubric(tmp_path / "empty.txt", "--judge-pairwise-rubric")
    assert info.value.param == "judge_pairwise_rubric"
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read it as UTF-8"):
        load_rubric(tmp_path / "bin.txt")


def test_a_score_range_other_than_1_10_needs_a_rubric_that_asks_for_it():
    with pytest.raises(ConfigError, match="default pointwise rubric asks for scores 1-10, not 1-5"):
        JudgeConfig(url="http://x/v1", model="m", score_range=(1, 5))
    with pytest.raises(ConfigError, match="pointwise rubric is empty"):
        JudgeConfig(url="http://x/v1", model="m", pointwise_rubric="  ")
    assert JudgeConfig(url="http://x/v1", model="m", score_range=(1, 5), pointwise_rubric=FIVE).score_range == (1, 5)


def test_a_custom_range_bounds_the_schema_and_rejects_scores_outside_it(counted_judge, tmp_path):
    judge_server, _ = counted_judge
    # In range: the schema sent says 1-5, so every constrained answer is a valid 1-5 score.
    judge = Judge(config(judge_server, tmp_path, pointwise_rubric=FIVE, score_range=(1, 5), repeats=1))
    try:
        outcomes = [judge.pointwise("q?", a, repeat=r) for a in ("yes", "no") for r in range(3)]
    finally:
        judge.close()
    assert all(o["ok"] and 1 <= o["score"] <= 5 and o["out_of_rubric"] == 0 for o in outcomes)
    # Test-only: the schema makes the judge answer 6-10, inside the default 1-10 but outside this
    # rubric's 1-5: every answer is rejected, so the check uses the custom range.
    wide = Judge(config(judge_server, tmp_path, pointwise_rubric=FIVE, score_range=(1, 5),
                        schema_score_range=(6, 10), attempts=2, cache_path=None))
    try:
        o = wide.pointwise("q?", "a")
    finally:
        wide.close()
    assert not o["ok"] and o["out_of_rubric"] == 2 and "outside the rubric's 1-5" in o["error"]


def test_a_changed_rubric_or_range_asks_the_judge_again_and_the_old_judgments_stay_cached(counted_judge, tmp_path):
    judge_server, served = counted_judge

    def calls(**kw) -> tuple[int, list[dict]]:
        before = served.calls
        judge = Judge(config(judge_server, tmp_path, **kw))  # one cache file for all of them
        try:
            outcomes = [judge.pointwise("q?", a) for a in ("yes", "no")]
        finally:
            judge.close()
        assert judge.http_calls == served.calls - before
        return judge.http_calls, outcomes

    first, outcomes = calls(pointwise_rubric=FIVE, score_range=(1, 5))
    assert first == 2 and not any(o["cached"] for o in outcomes)
    assert calls(pointwise_rubric=FIVE, score_range=(1, 5))[0] == 0  # the same rubric: all from the cache
    assert calls(pointwise_rubric="Grade 1-5 strictly. JSON.", score_range=(1, 5))[0] == 2  # another rubric
    assert calls(pointwise_rubric=FIVE, score_range=(1, 4))[0] == 2  # the same text, another range
    assert calls(pointwise_rubric=FIVE, score_range=(1, 5), system_rubric=False)[0] == 2  # rubric elsewhere
    again, cached = calls(pointwise_rubric=FIVE, score_range=(1, 5))
    assert again == 0 and [o["score"] for o in cached] == [o["score"] for o in outcomes]

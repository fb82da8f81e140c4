"""benchmarks/app_layer.py --quick end to end: every section runs against real servers and records
figures that say the layer did its work (hits were hits, misses were misses, retrieval found sources)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "app_layer_quick.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "app_layer.py"), "--quick", "--work-dir",
                          str(tmp / "work"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "| threshold | verify |" in run.stdout and "layer overhead" in run.stdout  # the tables are printed
    return json.loads(out.read_text())


def test_cache_table_covers_thresholds_languages_and_both_verify_settings(result):
    rows = result["sections"]["cache"]["rows"]
    assert {(r["threshold"], r["verify"]) for r in rows} == {(t, v) for t in (0.75, 0.90) for v in (True, False)}
    assert {r["lang"] for r in rows} == {"all", "en", "zh"}
    by = {(r["threshold"], r["verify"], r["lang"]): r for r in rows}
    # verification is what removes false hits at a loose threshold
    assert by[0.75, True, "all"]["false_hit_rate"] < by[0.75, False, "all"]["false_hit_rate"]


def test_latency_passes_are_misses_then_exact_hits_and_hits_are_faster(result):
    lat = result["sections"]["latency"]
    reqs = lat["requests"]
    assert [x["cache"] for x in reqs["1 miss (generation)"]] == ["miss"] * lat["pairs"]
    assert [x["cache"] for x in reqs["2 exact repeat"]] == ["hit"] * lat["pairs"]
    assert any(x["cache"] == "hit" for x in reqs["3 paraphrase"]) and lat["near_hits_with_own_answer"] >= 1
    s = lat["summary"]
    assert s["2 exact repeat [all]"]["p50_ms"] < s["1 miss (generation) [all]"]["p50_ms"]


def test_retrieval_and_guard_tables_hold_measured_metrics(result):
    rag = result["sections"]["rag"]
    assert set(rag["modes"]) == {"dense", "bm25", "hybrid"} and rag["ingest"]["index_chunks"] > 0
    assert all(0 < m["hit@5"] <= 1 and m["ndcg@5"] <= m["hit@5"] for m in rag["modes"].values())
    guard = result["sections"]["guard"]
    assert set(guard["injection"]) >= {"rules", "detector", "combined", "per_category"}
    assert guard["injection"]["combined"]["recall"] >= guard["injection"]["rules"]["recall"]
    assert {"EMAIL", "PHONE", "CREDIT_CARD"} <= set(guard["pii"]["per_type"])


def test_throughput_rows_never_hit_the_cache_and_rag_lengthens_prompts(result):
    rows = result["sections"]["throughput"]["rows"]
    assert list(rows) == ["plain", "cache + guard", "cache + guard, steps in the server's process",
                          "all on (cache + RAG + guard)"]
    requests = result["args"]["requests"]
    for name in ("cache + guard", "cache + guard, steps in the server's process", "all on (cache + RAG + guard)"):
        (r,) = rows[name]["rounds"]
        assert r["cache_lookups"] == {"hit": 0, "miss": requests, "bypass": 0}
        assert r["guard_actions"]["blocked"] == 0 and set(r["step_mean_ms"]) >= {"guard_input", "cache_lookup"}
    assert rows["all on (cache + RAG + guard)"]["rounds"][0]["rag_retrievals"] == requests
    assert rows["plain"]["rounds"][0]["cache_lookups"]["miss"] == 0
    assert rows["all on (cache + RAG + guard)"]["median"]["prompt_tokens_per_request"] > \
        2 * rows["plain"]["median"]["prompt_tokens_per_request"]
    assert all(rec["median"]["tok_s"] > 0 and rec["ratio_to_plain"] > 0 for rec in rows.values())

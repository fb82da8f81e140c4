"""Alerts over serving metrics (serve/alerts.py): the detectors on synthetic series, the gauge and
the log line from a real server whose engine is slowed down mid-run, the config, the Prometheus rules."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from genforge.common.errors import ConfigError
from genforge.serve.alerts import AlertSpec, Tracker, signals, snapshot
from genforge.serve.app_config import AppConfig, load_app_config
from genforge.serve.engine import TEST_DELAY_ENV, _parse_test_delay
from tests.serve.conftest import lm_server

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"


def run(tracker: Tracker, name: str, series) -> list:
    changes = []
    for i, x in enumerate(series):
        changes += tracker.update(float(i), {name: float(x)})
    return changes


# IsolationForest refits every sample (~0.1 s each here): a shorter series keeps the test fast
@pytest.mark.parametrize("detector,n", [("zscore", 300), ("iforest", 40)])
def test_a_step_in_ttft_is_flagged_and_steady_noise_is_not(detector, n):
    rng = np.random.default_rng(0)
    steady = 0.1 + 0.01 * rng.standard_normal(n)  # noisy but ordinary TTFT
    tracker = Tracker(AlertSpec(detector=detector, window=30))
    assert run(tracker, "ttft", steady) == []
    step = 0.3 + 0.01 * rng.standard_normal(10)
    changes = run(tracker, "ttft", step)
    started = [c for c in changes if c.active]
    assert started and started[0].signal == "ttft"
    # the z-score flags the second slow sample; the forest's score of a point beyond the window's
    # range saturates near 0.7-0.8 on 30 samples, so its first slow samples may fall just short
    assert started[0].t == tracker.spec.consecutive - 1 if detector == "zscore" else started[0].t <= 3
    if detector == "zscore":  # it holds until the slow samples are half the window; the forest soon
        assert tracker.active["ttft"]  # finds a cluster of them no longer easy to isolate (masking)


@pytest.mark.parametrize("detector", ["zscore", "iforest"])
def test_only_the_bad_direction_counts(detector):
    """Throughput going up, TTFT going down: good news, never an alert."""
    rng = np.random.default_rng(1)
    tracker = Tracker(AlertSpec(detector=detector, window=20))
    run(tracker, "throughput", 500 + 20 * rng.standard_normal(20))
    assert run(tracker, "throughput", [900] * 5) == []
    assert [c.active for c in run(tracker, "throughput", [100] * 3)] == [True]


def test_an_anomaly_clears_when_the_signal_returns():
    tracker = Tracker(AlertSpec(window=40))
    rng = np.random.default_rng(2)
    run(tracker, "ttft", 0.1 + 0.01 * rng.standard_normal(40))
    assert [c.active for c in run(tracker, "ttft", [0.5] * 3 + [0.1] * 3)] == [True, False]


def test_a_flat_signal_does_not_alarm_at_its_first_small_change():
    """No 5xx for a long time (MAD 0): one failed request in fifty is not 'infinitely' anomalous,
    half of them failing is."""
    tracker = Tracker(AlertSpec())
    run(tracker, "error_rate", [0.0] * 30)
    assert run(tracker, "error_rate", [0.02, 0.02, 0.0]) == []
    assert [c.active for c in run(tracker, "error_rate", [0.5, 0.5])] == [True]


def test_signals_from_counter_snapshots():
    prev = snapshot([("genforge:generation_tokens_total", {}, 100.0),
                     ("genforge:time_to_first_token_seconds_sum", {}, 1.0),
                     ("genforge:time_to_first_token_seconds_count", {}, 10.0)])
    cur = snapshot([("genforge:generation_tokens_total", {}, 300.0),
                    ("genforge:time_to_first_token_seconds_sum", {}, 2.0),
                    ("genforge:time_to_first_token_seconds_count", {}, 12.0),
                    ("genforge:num_requests_waiting", {}, 3.0),
                    ("genforge:http_requests_total", {"endpoint": "/v1/completions", "status": "200"}, 3.0),
                    ("genforge:http_requests_total", {"endpoint": "/v1/completions", "status": "503"}, 1.0),
                    ("genforge:http_requests_total", {"endpoint": "/metrics", "status": "500"}, 50.0)])
    out = signals(prev, cur, 2.0)
    assert out["throughput"] == 100.0 and out["ttft"] == 0.5 and out["queue_depth"] == 3.0
    assert out["error_rate"] == 0.25  # /metrics is not an API request
    assert "cache_hit_rate" not in out  # no cache lookups at all: the cache is off
    idle = signals(cur, cur, 2.0)
    assert np.isnan(idle["ttft"]) and np.isnan(idle["error_rate"]) and idle["throughput"] == 0


def test_config_flags_over_the_yaml(tmp_path):
    p = tmp_path / "serve.yaml"
    p.write_text("alerts:\n  detector: iforest\n  window: 30\n")
    cfg = load_app_config(p, alerts={"window": 12, "interval_s": None, "enabled": False})
    assert (cfg.alerts.detector, cfg.alerts.window, cfg.alerts.interval_s, cfg.alerts.enabled) == \
        ("iforest", 12, 5.0, False)
    assert AppConfig().alerts.enabled and AppConfig().alerts.detector == "zscore"
    p.write_text("alerts:\n  detector: prophet\n")
    with pytest.raises(ConfigError, match="alerts.detector"):
        load_app_config(p)
    with pytest.raises(ConfigError, match=TEST_DELAY_ENV):
        _parse_test_delay("0.1@soon")
    assert _parse_test_delay("0.02@3-6") == (0.02, 3.0, 6.0)


def _load(url: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            with c.stream("POST", url + "/v1/completions", json={"model": "nano", "prompt": "the quick",
                                                                 "max_tokens": 8, "ignore_eos": True,
                                                                 "stream": True}) as r:
                for _ in r.iter_lines():
                    pass


def test_a_live_server_flags_an_injected_slowdown(model, tok, monkeypatch, caplog):
    """A real server on a real port, sampling every 0.2 s: its engine sleeps 50 ms per iteration
    from 3 s to 6 s after it starts; the gauge goes to 1, a WARNING says which signal, an INFO
    says it cleared."""
    monkeypatch.setenv(TEST_DELAY_ENV, "0.05@3-6")
    caplog.set_level(logging.INFO, logger="genforge.serve.alerts")
    cfg = AppConfig(alerts=AlertSpec(interval_s=0.2, window=10, min_samples=8))
    with lm_server((model, tok), app_config=cfg) as live:
        onset = time.monotonic() + 3  # the engine started with the server: within a few ms of now
        stop = threading.Event()
        clients = [threading.Thread(target=_load, args=(live.url, stop), daemon=True) for _ in range(2)]
        for t in clients:
            t.start()
        seen: set[str] = set()
        try:
            deadline = time.monotonic() + 9
            while time.monotonic() < deadline:
                flagged = {s for s in ("ttft", "throughput") if live.metric("genforge:anomaly", signal=s) == 1}
                if flagged and time.monotonic() < onset:
                    pytest.fail(f"flagged {flagged} before the slowdown")
                seen |= flagged
                if seen and any("anomaly cleared" in r.message for r in caplog.records):
                    break
                time.sleep(0.05)
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=10)
        assert live.metric("genforge:anomaly_score", signal="ttft") != 0
    assert seen, "no anomaly gauge went to 1 during the slowdown"
    started = [r for r in caplog.records if r.levelno == logging.WARNING and "anomaly started" in r.message]
    cleared = [r for r in caplog.records if r.levelno == logging.INFO and "anomaly cleared" in r.message]
    assert started and any(s in started[0].message for s in seen), [r.message for r in started]
    assert "median of the last" in started[0].message and cleared


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install "
                    "prometheus; `make test` installs it where it can)")
def test_prometheus_rules_check_and_unit_tests():
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        r = subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

"""Alerts over the server's own metrics: a rolling window of samples and an anomaly detector.

Every `interval_s` a thread (never the request path) reads the server's Prometheus counters in
process (`registry.collect()`, the same numbers /metrics shows), turns the change since the last
sample into signals, and asks a detector whether the newest sample is out of line with the window:

    throughput      generated tokens per second                     bad when low
    ttft            mean time to first token of the interval (s)    bad when high
    queue_depth     sequences waiting for a batch slot (now)        bad when high
    error_rate      5xx share of the /v1 requests of the interval   bad when high
    cache_hit_rate  semantic-cache hits / lookups (cache on only)   bad when low

Detectors (both score one signal at a time against that signal's window, in its bad direction):
- `zscore`: robust z-score, (x - median) / (1.4826 * MAD), the MAD floored so that a signal that
  has been flat (no errors at all: MAD 0) does not turn its first small change into a huge score.
- `iforest`: scikit-learn's IsolationForest fitted on the window; the score is its anomaly score
  (0.5 ordinary, towards 1 easy to isolate), counted only on the signal's bad side of the median.
The default is `zscore`, from benchmarks/alerts.py (recorded serve streams with an injected
slowdown, replayed through both; benchmarks/results/alerts*.json, the README's "Alerts"): on a
+5 ms/iteration slowdown both caught it 10 s after the onset with no false alarm at their default
thresholds; on a +1.5 ms one the z-score stayed silent while the forest caught 3 of 5 replays only
at 9 false alarms an hour (none caught at a threshold without false alarms); and a z-score sample
costs ~0.15 ms against the forest's ~50 ms (it refits per signal per sample).

An anomaly starts after `consecutive` samples over the threshold and clears after as many under
it. Each start is a WARNING log line, each clear an INFO line, and the state is the gauge
`genforge:anomaly{signal}` (0/1) beside `genforge:anomaly_score{signal}`. Anomalous samples stay
in the window, so a lasting change becomes the new normal after about half a window: the
Prometheus rules (deploy/prometheus/alerts.yml) hold the absolute limits that must keep firing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Gauge

from genforge.common.config import Spec, rng

log = logging.getLogger(__name__)

DETECTORS = ["zscore", "iforest"]
# signal -> (+1: bad when high, -1: bad when low; the smallest spread the z-score divides by)
SIGNALS: dict[str, tuple[int, float]] = {
    "throughput": (-1, 1.0),       # tokens/s
    "ttft": (+1, 1e-4),            # seconds
    "queue_depth": (+1, 1.0),      # sequences
    "error_rate": (+1, 0.01),      # share
    "cache_hit_rate": (-1, 0.02),  # share
}
_REL_FLOOR = 0.05  # ... and at least 5% of the median: a near-constant signal is not alarming at 1 ULP


class AlertSpec(Spec):
    """The `alerts:` section of the serve config (flags: --alerts/--no-alerts, --alert-*)."""

    enabled: bool = True
    interval_s: float = rng(5.0, min=0.01, max=3600, help="seconds between samples")
    window: int = rng(60, min=8, max=100_000, help="samples the detector compares the newest one with")
    detector: str = rng("zscore", choices=DETECTORS)
    zscore_threshold: float = rng(6.0, min=0, min_exclusive=True)
    iforest_threshold: float = rng(0.7, min=0, max=1, min_exclusive=True)
    consecutive: int = rng(2, min=1, max=100, help="samples over (under) the threshold to start (clear)")
    min_samples: int = rng(8, min=4, help="samples in the window before anything is flagged")

    @property
    def threshold(self) -> float:
        return self.zscore_threshold if self.detector == "zscore" else self.iforest_threshold


# ---------------------------------------------------------------- samples and signals

Snapshot = dict[str, float]  # running totals of the counters the signals are made from


def snapshot(samples: Iterable[tuple[str, dict[str, str], float]]) -> Snapshot:
    """The totals of one scrape, from (name, labels, value) samples: `registry.collect()` in the
    server, the parsed /metrics text in benchmarks/alerts.py (the same names either way)."""
    snap: Snapshot = {"tokens": 0.0, "ttft_sum": 0.0, "ttft_count": 0.0, "waiting": 0.0,
                      "requests": 0.0, "server_errors": 0.0}
    for name, labels, value in samples:
        if name == "genforge:generation_tokens_total":
            snap["tokens"] += value
        elif name == "genforge:time_to_first_token_seconds_sum":
            snap["ttft_sum"] += value
        elif name == "genforge:time_to_first_token_seconds_count":
            snap["ttft_count"] += value
        elif name == "genforge:num_requests_waiting":
            snap["waiting"] += value
        elif name == "genforge:http_requests_total" and labels.get("endpoint", "").startswith("/v1/"):
            snap["requests"] += value
            if labels.get("status", "").startswith("5"):
                snap["server_errors"] += value
        elif name == "genforge:cache_lookups_total" and labels.get("result") in ("hit", "miss"):
            key = "cache_" + labels["result"]
            snap[key] = snap.get(key, 0.0) + value
    return snap


def signals(prev: Snapshot, cur: Snapshot, seconds: float) -> dict[str, float]:
    """The signals of the interval between two snapshots; NaN where the interval says nothing
    (no first token, no request, no cache lookup in it)."""
    def delta(key: str) -> float:
        return cur.get(key, 0.0) - prev.get(key, 0.0)

    nan = float("nan")
    first_tokens, requests = delta("ttft_count"), delta("requests")
    out = {"throughput": delta("tokens") / seconds,
           "ttft": delta("ttft_sum") / first_tokens if first_tokens > 0 else nan,
           "queue_depth": cur.get("waiting", 0.0),
           "error_rate": delta("server_errors") / requests if requests > 0 else nan}
    if "cache_hit" in cur or "cache_miss" in cur:
        lookups = delta("cache_hit") + delta("cache_miss")
        out["cache_hit_rate"] = delta("cache_hit") / lookups if lookups > 0 else nan
    return out


# ---------------------------------------------------------------- detectors


def robust_z(history: np.ndarray, x: float, direction: int, floor: float) -> float:
    """How many robust standard deviations `x` lies from the history's median, in the bad direction."""
    median = float(np.median(history))
    spread = max(1.4826 * float(np.median(np.abs(history - median))), floor, _REL_FLOOR * abs(median))
    return direction * (x - median) / spread


def iforest_score(history: np.ndarray, x: float, direction: int, seed: int = 0) -> float:
    """IsolationForest's anomaly score of `x` (0.5 ordinary, up to 1) when it lies on the bad side
    of the history's median, else 0."""
    from sklearn.ensemble import IsolationForest

    if direction * (x - float(np.median(history))) <= 0:
        return 0.0
    forest = IsolationForest(n_estimators=50, random_state=seed).fit(history.reshape(-1, 1))
    return float(-forest.score_samples(np.array([[x]]))[0])


@dataclass
class Change:
    """An anomaly that started (`active`) or cleared on `signal` at sample time `t`."""

    t: float
    signal: str
    active: bool
    value: float
    median: float
    score: float


@dataclass
class Tracker:
    """The window and the on/off state per signal; `update` takes one sample's signals.

    Pure (no threads, no metrics), so benchmarks/alerts.py replays recorded streams through the
    very code the server runs."""

    spec: AlertSpec
    windows: dict[str, deque] = field(default_factory=dict)
    active: dict[str, bool] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    _streak: dict[str, int] = field(default_factory=dict)

    def score(self, name: str, history: np.ndarray, x: float) -> float:
        direction, floor = SIGNALS[name]
        if self.spec.detector == "zscore":
            return robust_z(history, x, direction, floor)
        return iforest_score(history, x, direction)

    def update(self, t: float, values: dict[str, float]) -> list[Change]:
        changes = []
        for name, x in values.items():
            window = self.windows.setdefault(name, deque(maxlen=self.spec.window))
            if math.isnan(x):
                continue  # nothing to say this interval: keep the state, the streak and the window
            if len(window) >= self.spec.min_samples:
                history = np.fromiter(window, dtype=float)
                score = self.score(name, history, x)
                self.scores[name] = score
                over = score > self.spec.threshold
                was = self.active.get(name, False)
                # a streak of samples that disagree with the current state flips it
                self._streak[name] = self._streak.get(name, 0) + 1 if over != was else 0
                if self._streak[name] >= self.spec.consecutive:
                    self.active[name], self._streak[name] = over, 0
                    changes.append(Change(t, name, over, x, float(np.median(history)), score))
            window.append(x)
        return changes


# ---------------------------------------------------------------- the sampler thread


def _registry_samples(registry) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in registry.collect():
        for s in family.samples:
            yield s.name, s.labels, s.value


class AlertSampler:
    """Samples `metrics` (serve/metrics.py ServeMetrics) every spec.interval_s in a daemon thread,
    feeds a Tracker, and publishes gauges and log lines. `start()` / `stop()` from the app's lifespan."""

    def __init__(self, metrics, spec: AlertSpec, clock: Callable[[], float] = time.monotonic):
        self.metrics, self.spec, self.clock = metrics, spec, clock
        self.tracker = Tracker(spec)
        m, r = metrics.model_name, metrics.registry
        self.flag = Gauge("genforge:anomaly", f"1 while the {spec.detector} detector flags the signal as anomalous "
                          "(serve/alerts.py).", ["model_name", "signal"], registry=r)
        self.score = Gauge("genforge:anomaly_score", f"The {spec.detector} detector's score of the signal's newest "
                           f"sample (flagged above {spec.threshold:g}).", ["model_name", "signal"], registry=r)
        for name in ("throughput", "ttft", "queue_depth", "error_rate"):
            self.flag.labels(m, name).set(0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prev: tuple[float, Snapshot] | None = None

    def start(self) -> None:
        if self._thread is None:
            self._prev = (self.clock(), self._snapshot())
            self._thread = threading.Thread(target=self._run, name="genforge-alerts", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _snapshot(self) -> Snapshot:
        return snapshot(_registry_samples(self.metrics.registry))

    def _run(self) -> None:
        while not self._stop.wait(self.spec.interval_s):
            try:
                self.tick()
            except Exception:  # a bug here must not take the server down; it stops alerting loudly
                log.exception("alert sampler failed; alerts are off until the server restarts")
                return

    def tick(self) -> list[Change]:
        """Take one sample now (the thread calls this every interval)."""
        now, snap = self.clock(), self._snapshot()
        t0, prev = self._prev
        self._prev = (now, snap)
        if now <= t0:
            return []
        changes = self.tracker.update(now, signals(prev, snap, now - t0))
        m = self.metrics.model_name
        for name, score in self.tracker.scores.items():
            self.score.labels(m, name).set(score)
        for c in changes:
            self.flag.labels(m, c.signal).set(1 if c.active else 0)
            what = (f"{c.signal} {c.value:.4g} (median of the last {len(self.tracker.windows[c.signal])} samples "
                    f"{c.median:.4g}; {self.spec.detector} score {c.score:.3g}, threshold {self.spec.threshold:g})")
            if c.active:
                log.warning("anomaly started: %s", what)
            else:
                log.info("anomaly cleared: %s", what)
        return changes

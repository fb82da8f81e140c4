"""Prometheus metrics of one served model.

Names follow vLLM's where the quantity is the same (`vllm:X` here is `genforge:X`, same labels and
units), so a vLLM dashboard ports by changing the prefix; they are not vLLM's names. The
`http_*`, `request_errors` metrics are genforge's own. The `model_name` label is the served
name (never a filesystem path).

Every app owns its own `CollectorRegistry`: tests start several apps in one process, and a
global registry would refuse the second set of metrics (duplicate names) and mix their values.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from genforge.serve.adapters import AdapterRegistry
from genforge.serve.engine import EngineObserver

# Latency buckets as vLLM uses them: from a few ms (a tiny model on a fast box) to minutes.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The server's metrics; `observe_*` methods are called by the request handlers."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, label = self.registry, ["model_name"]
        self.running = Gauge("genforge:num_requests_running", "Sequences being decoded in the batch.",
                             label, registry=r)
        self.waiting = Gauge("genforge:num_requests_waiting", "Sequences queued for a batch slot.",
                             label, registry=r)
        self.ttft = Histogram("genforge:time_to_first_token_seconds",
                              "Time from the request's arrival to the write of the first token to the client "
                              "(non-streamed: of the whole response).", label, buckets=_TTFT_BUCKETS, registry=r)
        self.queue_time = Histogram("genforge:request_queue_time_seconds",
                                    "Time a sequence waited in the queue for a batch slot.", label,
                                    buckets=_QUEUE_BUCKETS, registry=r)
        self.kv_usage = Gauge("genforge:kv_cache_usage_perc",
                              "Fraction (0-1) of the KV cache's token capacity held by running sequences.",
                              label, registry=r)
        self.errors = Counter("genforge:request_errors", "Failed HTTP requests by kind (invalid_request, auth, "
                              "not_found, too_large, timeout, overloaded, client_disconnected, engine, "
                              "internal).", label + ["kind"], registry=r)
        self.itl = Histogram("genforge:inter_token_latency_seconds", "Time between two tokens of a sequence.",
                             label, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("genforge:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             label, buckets=_E2E_BUCKETS, registry=r)
        self.prompt_len = Histogram("genforge:request_prompt_tokens", "Prompt tokens per request.",
                                    label, buckets=_TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram("genforge:request_generation_tokens", "Generated tokens per request.",
                                 label, buckets=_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("genforge:prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.generation_tokens = Counter("genforge:generation_tokens", "Tokens generated.", label, registry=r)
        self.success = Counter("genforge:request_success", "Sequences finished, by finish reason.",
                               label + ["finished_reason"], registry=r)
        self.http = Counter("genforge:http_requests", "HTTP requests by endpoint and status code.",
                            label + ["endpoint", "status"], registry=r)
        self.http_latency = Histogram("genforge:http_request_duration_seconds",
                                      "Wall time of HTTP requests (streams: until the last byte).",
                                      label + ["endpoint"], buckets=_E2E_BUCKETS, registry=r)

        # the application layer (serve/pipeline.py): one counter per outcome, one latency per step
        self.cache_lookups = Counter("genforge:cache_lookups", "Semantic cache lookups by result (hit, miss, "
                                     "bypass: the request was not eligible).", label + ["result"], registry=r)
        self.cache_rejections = Counter("genforge:cache_verification_rejections",
                                        "Near matches above the similarity threshold that the verifier rejected.",
                                        label, registry=r)
        self.guard_actions = Counter("genforge:guard_actions", "Guard findings by direction (input, output) and "
                                     "action (blocked, redacted, logged).", label + ["direction", "action"],
                                     registry=r)
        self.retrievals = Counter("genforge:rag_retrievals", "Requests answered with retrieved context.", label,
                                  registry=r)
        self.step_latency = Histogram("genforge:app_step_duration_seconds", "Time of each application-layer "
                                      "step (guard_input, cache_lookup, retrieve, cache_put; prepare: all of them before the engine may start, "
                                      "settle: the wait for the deferred ones).", label + ["step"],
                                      buckets=_QUEUE_BUCKETS, registry=r)

    def bind_engine(self, num_running: Callable[[], int], num_waiting: Callable[[], int],
                    kv_cache_usage: Callable[[], float] | None = None) -> None:
        """Read the engine's queue sizes at scrape time rather than mirroring them by hand."""
        self.running.labels(self.model_name).set_function(lambda: float(num_running()))
        self.waiting.labels(self.model_name).set_function(lambda: float(num_waiting()))
        if kv_cache_usage is not None:
            self.kv_usage.labels(self.model_name).set_function(lambda: float(kv_cache_usage()))

    def bind_adapters(self, registry: AdapterRegistry) -> None:
        """Per-adapter series (the base counts under its own name): requests, generated tokens,
        loads from disk and evictions, and how many adapters are in memory now."""
        r, label = self.registry, ["model_name", "adapter"]
        self.adapter_requests = Counter("genforge:adapter_requests", "Requests by adapter (the base under its "
                                        "own name).", label, registry=r)
        tokens = Counter("genforge:adapter_generation_tokens", "Tokens generated, by adapter.", label, registry=r)
        loads = Counter("genforge:adapter_loads", "Adapter weights read from disk into a slot.", label, registry=r)
        evictions = Counter("genforge:adapter_evictions", "Adapters evicted (least recently used) to free a slot.",
                            label, registry=r)
        loaded = Gauge("genforge:adapters_loaded", "Adapters whose weights are in memory.", ["model_name"],
                       registry=r)
        m = self.model_name
        loaded.labels(m).set_function(lambda: float(len(registry.loaded())))

        def on_load(name: str, evicted: str | None) -> None:
            loads.labels(m, name).inc()
            if evicted is not None:
                evictions.labels(m, evicted).inc()

        registry.on_load = on_load
        registry.on_finish = lambda name, n: tokens.labels(m, name).inc(n)

    def observe_adapter_request(self, adapter: str) -> None:
        self.adapter_requests.labels(self.model_name, adapter).inc()

    def observer(self) -> EngineObserver:
        """The engine's hooks, mapped onto these metrics (called from the scheduler thread;
        prometheus_client's metrics are thread-safe)."""
        return _Observer(self)

    def observe_prompt(self, prompt_tokens: int) -> None:
        """Counted once per prompt, not once per choice: n > 1 shares one prompt."""
        self.prompt_len.labels(self.model_name).observe(prompt_tokens)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)

    def observe_ttft(self, seconds: float) -> None:
        """Called by the HTTP layer once the first token's bytes were handed to the socket."""
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_error(self, kind: str) -> None:
        self.errors.labels(self.model_name, kind).inc()

    def observe_http(self, endpoint: str, status: int, seconds: float) -> None:
        self.http.labels(self.model_name, endpoint, str(status)).inc()
        self.http_latency.labels(self.model_name, endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Observer(EngineObserver):
    """Engine-side timings: inter-token latency, queue time, end to end. TTFT is not taken here but
    where the client can see the token (the HTTP layer, serve/gate.py)."""

    def __init__(self, metrics: ServeMetrics):
        m = metrics.model_name
        self.queue, self.itl, self.e2e = metrics.queue_time.labels(m), metrics.itl.labels(m), metrics.e2e.labels(m)
        self.gen_len, self.gen_tokens = metrics.gen_len.labels(m), metrics.generation_tokens.labels(m)
        self.success, self.model_name = metrics.success, m

    def on_admit(self, queue_seconds: float) -> None:
        self.queue.observe(queue_seconds)

    def on_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_finish(self, *, e2e_seconds: float, prompt_tokens: int, completion_tokens: int,
                  finish_reason: str) -> None:
        self.e2e.observe(e2e_seconds)
        self.gen_len.observe(completion_tokens)
        self.gen_tokens.inc(completion_tokens)
        self.success.labels(self.model_name, finish_reason).inc()

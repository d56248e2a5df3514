"""Engine metrics with vLLM's names and meanings under prmkern's prefix (`vllm:X` is `prmkern:X` here), each with a
`model_name` label: what LLM.get_metrics() returns and what the server's /metrics adds to its own counters.

The engine records per-request times as they happen (queue time, time to first token, inter-token latency,
end-to-end latency) in histograms; gauges (running / waiting requests, KV-cache usage) and token counters are read
from the engine when asked. The reader objects (Counter, Gauge, Histogram) mirror vllm.v1.metrics.reader's.
This module knows nothing of HTTP; docs/reference.md is generated from METRICS.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

PREFIX = "prmkern:"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
LONG_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

# name (without the prefix) -> (kind, help). The help text states vLLM's meaning, which these keep.
METRICS: dict[str, tuple[str, str]] = {
    "num_requests_running": ("gauge", "Requests with at least one chain holding KV blocks (prefilling or decoding)."),
    "num_requests_waiting": ("gauge", "Requests queued in the engine, none of whose chains holds KV blocks yet."),
    "kv_cache_usage_perc": ("gauge", "Fraction of the KV-cache pool's blocks in use (1 = full)."),
    "prompt_tokens": ("counter", "Prompt tokens submitted (once per request)."),
    "generation_tokens": ("counter", "Tokens generated, over all chains."),
    "prefix_cache_queries": ("counter", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("counter", "Prompt tokens found in the prefix cache (hits / queries = hit rate)."),
    "num_preemptions": ("counter", "Chains preempted for lack of KV blocks (recomputed later)."),
    "request_success": ("counter", "Requests finished without an error or an abort."),
    "verifications": ("counter", "Solutions verified (rate() = verifications per second)."),
    "verification_chains": ("counter", "Verification chains completed (rate() = chains per second)."),
    "request_queue_time_seconds": ("histogram", "Seconds from a request's arrival to its first scheduled step."),
    "time_to_first_token_seconds": ("histogram", "Seconds from a request's arrival to its first generated token."),
    "inter_token_latency_seconds": ("histogram", "Seconds between consecutive tokens of one chain."),
    "e2e_request_latency_seconds": ("histogram", "Seconds from a request's arrival to its end."),
}
BUCKETS = {"request_queue_time_seconds": LONG_BUCKETS, "time_to_first_token_seconds": LATENCY_BUCKETS,
           "inter_token_latency_seconds": TOKEN_GAP_BUCKETS, "e2e_request_latency_seconds": LONG_BUCKETS}


class HistogramData:
    """Cumulative-bucket histogram (Prometheus' layout: counts per upper bound, +Inf last)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> dict[str, int]:
        out, total = {}, 0
        for bound, n in zip(list(self.buckets) + [float("inf")], list(self.counts)):
            total += n
            out["+Inf" if bound == float("inf") else repr(bound)] = total
        return out

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{le}"}} {n}' for le, n in self.cumulative().items()]
        return out + [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {self.count}"]


# -- the reader objects of LLM.get_metrics(), as vllm.v1.metrics.reader has them -------------------------------------
@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int] = field(default_factory=dict)  # upper bound -> cumulative count


class EngineMetrics:
    """What the engine records as it runs (its step thread), read by get_metrics() and /metrics (any thread)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._lock = threading.Lock()
        self.histograms = {name: HistogramData(b) for name, b in BUCKETS.items()}
        self.request_success = 0
        self.verifications = 0
        self.verification_chains = 0

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self.histograms[name].observe(max(0.0, seconds))

    def request_finished(self, request: Any) -> None:
        """Called once per request when it ends (engine._forget_finished / abort)."""
        t = request.arrival_time
        with self._lock:
            if request.first_scheduled_time is not None:
                self.histograms["request_queue_time_seconds"].observe(max(0.0, request.first_scheduled_time - t))
            if request.first_token_time is not None:
                self.histograms["time_to_first_token_seconds"].observe(max(0.0, request.first_token_time - t))
            if request.finished_time is not None:
                self.histograms["e2e_request_latency_seconds"].observe(max(0.0, request.finished_time - t))
            if request.error is None and not request.aborted:
                self.request_success += 1

    def count_verifications(self, solutions: int, chains: int) -> None:
        with self._lock:
            self.verifications += solutions
            self.verification_chains += chains

    def values(self, engine: Any) -> dict[str, Any]:
        """name (without prefix) -> int / float, or HistogramData for histograms; gauges read from `engine` now."""
        scheduler, blocks, stats = engine.scheduler, engine.block_manager, engine.stats
        running = {s.request.request_id for s in list(scheduler.running)}
        waiting = {s.request.request_id for s in list(scheduler.waiting)} - running
        with self._lock:
            hists = {k: _copy(h) for k, h in self.histograms.items()}
            counts = {"request_success": self.request_success, "verifications": self.verifications,
                      "verification_chains": self.verification_chains}
        return {"num_requests_running": len(running), "num_requests_waiting": len(waiting),
                "kv_cache_usage_perc": 1.0 - blocks.num_free_blocks / blocks.num_blocks,
                "prompt_tokens": stats.prompt_tokens, "generation_tokens": stats.generated_tokens,
                "prefix_cache_queries": stats.prompt_tokens, "prefix_cache_hits": stats.cached_tokens,
                "num_preemptions": stats.preemptions, **counts, **hists}

    def snapshot(self, engine: Any) -> list[Metric]:
        """LLM.get_metrics(): one reader object per metric, in METRICS' order."""
        labels = {"model_name": self.model_name}
        out: list[Metric] = []
        for name, value in self.values(engine).items():
            kind = METRICS[name][0]
            full = PREFIX + name
            if kind == "histogram":
                out.append(Histogram(full, dict(labels), value.count, value.sum, value.cumulative()))
            elif kind == "counter":
                out.append(Counter(full, dict(labels), int(value)))
            else:
                out.append(Gauge(full, dict(labels), float(value)))
        return out

    def prometheus(self, engine: Any) -> list[str]:
        """The same in Prometheus' text format (counters get the `_total` suffix, as vLLM's do)."""
        labels = f'model_name="{_escape(self.model_name)}"'
        lines: list[str] = []
        for name, value in self.values(engine).items():
            kind, help_ = METRICS[name]
            full = PREFIX + name + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}"]
            if kind == "histogram":
                lines += value.lines(full, labels)
            else:
                lines.append(f"{full}{{{labels}}} {value}")
        return lines


def _copy(h: HistogramData) -> HistogramData:
    c = HistogramData(h.buckets)
    c.counts, c.sum, c.count = list(h.counts), h.sum, h.count
    return c


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

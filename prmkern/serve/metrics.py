"""Server metrics in Prometheus' text exposition format (version 0.0.4), without a client library.

Counters and latency histograms are updated by the HTTP handlers (one thread: the event loop); engine counters
(tokens, prefix-cache hits, preemptions) and gauges (queue depth, running chains, free KV blocks) are read from
the engine at scrape time. Reading those ints from another thread is safe: each read is one attribute load.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

# One histogram for the engine and the server: cumulative buckets in Prometheus' layout.
from prmkern.metrics import HistogramData as Histogram

ENGINE_COUNTERS = {  # EngineStats field -> (metric name, help)
    "requests": ("prmkern_engine_requests_total", "Requests submitted to the engine (verify submits several)."),
    "failed_requests": ("prmkern_engine_failed_requests_total",
                        "Engine requests that failed: invalid on arrival, or a fault in their step."),
    "aborted_requests": ("prmkern_engine_aborted_requests_total",
                         "Engine requests aborted (their client went away, or shutdown)."),
    "prompt_tokens": ("prmkern_prompt_tokens_total", "Prompt tokens submitted."),
    "prefill_tokens": ("prmkern_prefill_tokens_total", "Prompt tokens computed by prefill."),
    "cached_tokens": ("prmkern_prefix_cache_hit_tokens_total", "Prompt tokens whose KV came from the prefix cache."),
    "generated_tokens": ("prmkern_generation_tokens_total", "Tokens generated."),
    "preemptions": ("prmkern_preemptions_total", "Sequences preempted for lack of KV blocks."),
    "prefill_steps": ("prmkern_prefill_steps_total", "Engine prefill steps."),
    "decode_steps": ("prmkern_decode_steps_total", "Engine decode steps."),
}


# The server's own metrics: name -> (type, help). Engine counters above; vLLM's names in prmkern/metrics.py.
SERVER_METRICS = {
    "prmkern_http_requests_total": ("counter", "HTTP requests answered, by path and status code."),
    "prmkern_request_latency_seconds": ("histogram", "End-to-end request latency, by endpoint."),
    "prmkern_time_to_first_token_seconds": ("histogram", "Streaming: seconds to the first token."),
    "prmkern_aborted_requests_total": ("counter", "Requests aborted because the client disconnected."),
    "prmkern_overloaded_requests_total": ("counter", "Requests refused (503) with the admission bound full."),
    "prmkern_pending_requests": ("gauge", "Requests submitted and not yet answered (the bounded queue)."),
    "prmkern_pending_requests_limit": ("gauge", "The bound on pending requests (--max-pending)."),
    "prmkern_pending_tokens": ("gauge", "Tokens admitted and not yet released (prompts + n * max_tokens)."),
    "prmkern_pending_tokens_limit": ("gauge", "The bound on admitted tokens (--max-pending-tokens)."),
    "prmkern_waiting_sequences": ("gauge", "Sequences queued in the engine, not yet holding KV blocks."),
    "prmkern_running_sequences": ("gauge", "Sequences holding KV blocks (prefilling or decoding)."),
    "prmkern_kv_blocks_total": ("gauge", "KV cache blocks in the pool."),
    "prmkern_kv_blocks_free": ("gauge", "KV cache blocks not referenced by a running sequence."),
}


ENGINE_HELP = {name: help_ for name, help_ in ENGINE_COUNTERS.values()}


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http_requests: dict[tuple[str, int], int] = defaultdict(int)  # (path, status) -> count
        self.latency: dict[str, Histogram] = defaultdict(Histogram)  # endpoint -> end-to-end seconds
        self.ttft: dict[str, Histogram] = defaultdict(Histogram)  # endpoint -> seconds to the first streamed token
        self.aborted = 0  # requests aborted because their client went away
        self.overloaded = 0  # requests refused with 503 because the queue was full

    def count_http(self, path: str, status: int) -> None:
        with self._lock:
            self.http_requests[(path, status)] += 1

    def observe_latency(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self.latency[endpoint].observe(seconds)

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self.ttft[endpoint].observe(seconds)

    def render(self, engine: Any, loop: Any) -> str:
        lines: list[str] = []

        def family(name: str) -> None:
            kind, help_ = SERVER_METRICS.get(name) or ("counter", ENGINE_HELP[name])
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("prmkern_http_requests_total")
            for (path, status), n in sorted(self.http_requests.items()):
                lines.append(f'prmkern_http_requests_total{{path="{path}",status="{status}"}} {n}')
            family("prmkern_request_latency_seconds")
            for endpoint, h in sorted(self.latency.items()):
                lines += h.lines("prmkern_request_latency_seconds", f'endpoint="{endpoint}"')
            family("prmkern_time_to_first_token_seconds")
            for endpoint, h in sorted(self.ttft.items()):
                lines += h.lines("prmkern_time_to_first_token_seconds", f'endpoint="{endpoint}"')
            family("prmkern_aborted_requests_total")
            lines.append(f"prmkern_aborted_requests_total {self.aborted}")
            family("prmkern_overloaded_requests_total")
            lines.append(f"prmkern_overloaded_requests_total {self.overloaded}")
        stats = engine.stats.as_dict()
        for key, (name, _) in ENGINE_COUNTERS.items():
            family(name)
            lines.append(f"{name} {stats.get(key, 0)}")
        scheduler = engine.scheduler
        gauges = {
            "prmkern_pending_requests": loop.pending,
            "prmkern_pending_requests_limit": loop.max_pending,
            "prmkern_pending_tokens": loop.pending_tokens,
            "prmkern_pending_tokens_limit": loop.max_pending_tokens,
            "prmkern_waiting_sequences": len(scheduler.waiting),
            "prmkern_running_sequences": len(scheduler.running),
            "prmkern_kv_blocks_total": engine.block_manager.num_blocks,
            "prmkern_kv_blocks_free": engine.block_manager.num_free_blocks,
        }
        for name, value in gauges.items():
            family(name)
            lines.append(f"{name} {value}")
        lines += engine.metrics.prometheus(engine)  # vLLM's names and meanings (prmkern/metrics.py)
        return "\n".join(lines) + "\n"

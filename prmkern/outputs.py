"""What generate() returns, in vLLM's names: a RequestOutput per prompt holding a CompletionOutput per chain, and
the Logprob entries of vLLM's per-position log-probability dicts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """One entry of a per-position {token_id: Logprob} dict (vLLM's class and meaning)."""
    logprob: float  # of the model's raw distribution at this position
    rank: int | None = None  # 1-based rank in the full vocabulary: how many tokens have a logprob >= this one's
    decoded_token: str | None = None  # tokenizer.decode([token_id]); None without a tokenizer


# Per position a dict {token_id: Logprob}; prompt logprobs have None at position 0 (and before prompt_logprobs_start).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int  # chain index within the request
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs; None unless logprobs was asked
    # per generated position, vLLM's dict: the sampled token, the top SamplingParams.logprobs (-1: all) and the
    # SamplingParams.logprob_token_ids; None when neither was asked
    logprobs: SampleLogprobs | None = None
    # "stop" (EOS, stop token or stop string), "length" (max_tokens, the model's context, or the KV pool: see
    # kv_pool_exhausted), "abort" (abort_request or an interrupted call) or "error" (the request failed mid-way).
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # prmkern's plain view of logprob_token_ids (also in .logprobs): per generated position {id: logprob}
    token_logprobs: list[dict[int, float]] | None = None
    # finish_reason "length" because the whole KV pool held this chain and it could not grow: not max_tokens.
    kv_pool_exhausted: bool = False

    @property
    def sampled_logprobs(self) -> list[float] | None:
        """The sampled token's log-probability at each position (from `logprobs`), or None."""
        if self.logprobs is None:
            return None
        return [d[t].logprob for d, t in zip(self.logprobs, self.token_ids)]

    def finished(self) -> bool:  # a method, as in vLLM
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """vLLM's per-request timings (RequestOutput.metrics), wall-clock seconds from time.time(); None where the
    request never got there (failed on arrival, aborted while queued)."""
    arrival_time: float
    first_scheduled_time: float | None = None  # its prompt's first prefill step
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0  # over all its chains

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def first_token_latency(self) -> float | None:  # vLLM V1's name for the time to first token
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    error: str | None = None  # set when this request failed alone (the rest of the batch still ran)
    prompt_logprobs: PromptLogprobs | None = None  # SamplingParams.prompt_logprobs
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (first admission)
    metrics: RequestMetrics | None = None  # vLLM's: arrival, queue, first and last token, finish times
    # vLLM's: SamplingParams.prompt_logprob_token_ids' log-probabilities, a float32 numpy array [rows, ids] (row i
    # scores prompt token prompt_logprob_start + i + 1; -inf where a row was padded with -1); None when not asked
    prompt_token_id_logprobs: Any = None

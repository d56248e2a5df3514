"""What generate() returns, in vLLM's names: a RequestOutput per prompt holding a CompletionOutput per chain."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int  # chain index within the request
    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # log-probability of each generated token (SamplingParams.logprobs)
    token_logprobs: list[dict[int, float]] | None  # per generated position, {id: logprob} for logprob_token_ids
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length" or "abort" (abort_request)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    error: str | None = None  # set when this request failed alone (the rest of the batch still ran)

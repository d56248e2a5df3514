"""Engine counters, kept across generate() calls until reset: what was asked, computed, reused and generated."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0  # prompt tokens submitted (once per request, not per chain)
    prefill_tokens: int = 0  # tokens run through the model in prefill steps (what was actually computed)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache instead
    generated_tokens: int = 0
    preemptions: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    failed_requests: int = 0  # failed on arrival (bad prompt or params) or mid-way (a fault in their step)
    aborted_requests: int = 0  # LLMEngine.abort_request (a client gone, an interrupted generate() call)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        for key in asdict(self):
            setattr(self, key, 0)

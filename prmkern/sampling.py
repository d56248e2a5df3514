"""SamplingParams: how a request's chains are sampled and when they stop, in vLLM's names, validated on creation."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """n: chains sampled per prompt (they share the prompt's KV blocks). temperature 0 is greedy.
    top_k <= 0 and top_p = 1 disable those filters. min_tokens suppresses EOS/stop tokens until reached.
    stop: strings that end a chain (the text is cut before the stop string unless include_stop_str_in_output).
    seed: reproduces this request's chains whatever else is batched with it.
    logprobs: also return the log-probability of each sampled token.
    logprob_token_ids: at every generated position, return the log-probabilities of these token ids (how verdict
    probabilities such as P(Yes) vs P(No) are read exactly). Log-probabilities are of the model's distribution
    (before temperature / top-k / top-p)."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_tokens: int = 0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: bool = False
    logprob_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid; accepted: {accepted}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an int >= 1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "a float >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise bad("top_k", "an int; <= 0 disables")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a float in (0, 1]")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"an int in [0, max_tokens={self.max_tokens}]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", "an int or None")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        self.stop_strings = tuple(stop)
        for name in ("stop_token_ids", "logprob_token_ids"):
            ids = getattr(self, name)
            if ids is not None and (not isinstance(ids, (list, tuple)) or
                                    any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids)):
                raise bad(name, "a list of non-negative token ids")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logprob_token_ids is not None:
            self.logprob_token_ids = list(self.logprob_token_ids)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 (vLLM's threshold too) dividing logits by the temperature overflows float32.
        return self.temperature < 1e-5

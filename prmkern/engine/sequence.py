"""A sequence (one chain: prompt + its generated tokens, its block table) and the request that owns n of them.

A request starts as one sequence; when its prompt is prefilled it is forked into n chains that point at the same
physical KV blocks (see BlockManager.fork). Sequences hold token ids and bookkeeping only: no tensors.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prmkern.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not holding blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # holding blocks: prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)  # identity: requests go in sets
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list["Sequence"] = field(default_factory=list)
    error: str | None = None
    aborted: bool = False  # stopped by LLMEngine.abort_request: its unfinished chains end as "abort"
    # prompt_logprobs: PositionLogprobs per prompt position (None where not computed); prompt_lp_next is the next
    # prompt position whose log-probability is still to be computed (len(prompt_token_ids): none is).
    prompt_logprobs: list = field(default_factory=list)
    prompt_lp_next: int = 0
    prompt_id_scores: torch.Tensor | None = None  # [rows, ids] float32: SamplingParams.prompt_logprob_token_ids
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    bad_words_token_ids: list[list[int]] | None = None  # SamplingParams.bad_words, tokenized (vLLM's variants)
    # Wall-clock times (time.time(), vLLM's RequestMetrics): arrival, first scheduled, first and last token, finish.
    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0
    # Pooling (a reward model's rows, prmkern/pooling.py): the PoolingParams, the prompt positions whose rows are
    # kept, the next of them still to compute (len(prompt_token_ids): none) and the rows computed so far.
    pooling: Any = None
    pool_positions: list[int] = field(default_factory=list)
    pool_next: int = 0
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, p = len(self.prompt_token_ids), self.params
        self.prompt_lp_next = n
        if self.error is None and p.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * n
            self.prompt_lp_next = min(p.prompt_logprobs_start, n)
        if self.error is None and p.prompt_logprob_token_ids is not None:  # filled by engine/prompt_scores.py
            rows = p.prompt_logprob_token_ids
            self.prompt_id_scores = torch.full((len(rows), len(rows[0])), float("nan"), dtype=torch.float32)
            self.prompt_lp_next = min(self.prompt_lp_next, (p.prompt_logprob_start or 0) + 1)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_lp_next < len(self.prompt_token_ids)

    @property
    def first_prompt_row(self) -> int | None:
        """The first prompt position whose output row (logits for prompt_logprobs, or the pooled head's row) is
        still needed; None when no prompt row is."""
        if self.pooling is not None:
            return self.pool_next if self.pool_next < len(self.prompt_token_ids) else None
        return self.prompt_lp_next - 1 if self.wants_prompt_logprobs else None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.aborted or (len(self.seqs) == self.params.n and
                                          all(s.status is SequenceStatus.FINISHED for s in self.seqs))


class Sequence:
    def __init__(self, seq_id: int, request: Request, chain_index: int, generator: torch.Generator):
        self.seq_id = seq_id
        self.request = request
        self.chain_index = chain_index
        self.last_token_time: float | None = None  # time.time() of this chain's latest token (inter-token latency)
        self.generator = generator  # this chain's own RNG: its samples do not depend on the batch
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.kv_pool_exhausted = False  # ended "length" because the whole KV pool held it and it could not grow
        self.stop_reason: str | int | None = None
        self.logprobs: list = []  # sampler.PositionLogprobs per generated token (when params.logprobs is set)
        self.token_logprobs: list[dict[int, float]] = []
        self.needs_fork = request.params.n > 1 and chain_index == 0
        # The runner's decode grouping key (leading shared blocks), valid for one (sharing epoch, table length).
        self.shared_prefix_cache: tuple[int, int, tuple[int, ...]] | None = None
        # Incremental detokenisation state (only used when the request has stop strings).
        self.text = ""
        self.prefix_offset = self.num_prompt_tokens
        self.read_offset = self.num_prompt_tokens

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def hides_stop_token(self) -> bool:
        """Whether the last generated token is a stop token (EOS or one of stop_token_ids) that ended the chain and
        whose text the output leaves out (unless include_stop_str_in_output), as vLLM's detokenizer does; token_ids
        keep it."""
        return (self.finish_reason == "stop" and not isinstance(self.stop_reason, str)
                and self.num_output_tokens > 0 and not self.params.include_stop_str_in_output)

    @property
    def text_token_ids(self) -> list[int]:
        """The generated tokens whose text is the output's text (see hides_stop_token)."""
        out = self.output_token_ids
        return out[:-1] if self.hides_stop_token else out

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def output_tokens_from(self, start: int) -> list[int]:
        """Generated tokens from output position `start` on (a watcher's new tokens, without copying the rest)."""
        return self.token_ids[self.num_prompt_tokens + start:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV the next forward pass must compute; 1 for a decoding sequence (its newest token)."""
        return self.num_tokens - self.num_computed_tokens

    def fork(self, seq_id: int, chain_index: int, generator: torch.Generator) -> "Sequence":
        child = Sequence(seq_id, self.request, chain_index, generator)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.block_table = list(self.block_table)
        child.status = self.status
        child.needs_fork = False
        child.shared_prefix_cache = None
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, chain={self.chain_index}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, {self.status.value})")

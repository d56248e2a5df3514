"""Pooling requests: what a reward model returns for a prompt, in vLLM's names and meanings.

A pooling model (here Qwen2ForProcessRewardModel, prmkern/models/qwen2_prm.py) runs prompts through the same
scheduler, KV cache and prefix cache as generation, but samples nothing: its head's rows are kept at chosen prompt
positions and the request ends when its prompt is prefilled. vLLM's STEP pooler is the one implemented: the rows
at the positions of `step_tag_id` (every position when it is None), restricted to the columns `returned_token_ids`
when given, then a softmax over the kept columns (`use_activation`). For Qwen2.5-Math-PRM this is
[num_steps, 2] probabilities; column 1 is P(step correct).

The prefix cache skips the blocks before the first pooled position, so solutions of one problem pay for the
problem's tokens once. Knows nothing of tokenization or of verification formats.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prmkern.sampling_params import _is_int


@dataclass
class PoolingParams:
    """step_tag_id: the token whose positions are pooled (None: the model's default; -1: every position);
    returned_token_ids: the head's columns to keep (None: all); use_activation: softmax over the kept columns
    (vLLM's `softmax` / `use_activation`); first_position (prmkern's, like prompt_logprobs_start): the first prompt
    position that may be pooled (a verification session scores only its new step)."""

    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    use_activation: bool = True
    first_position: int = 0  # prmkern's: positions before this are not pooled (their blocks may come from the cache)

    def __post_init__(self) -> None:
        if self.step_tag_id is not None and (not _is_int(self.step_tag_id) or self.step_tag_id < -1):
            raise ValueError(f"PoolingParams.step_tag_id={self.step_tag_id!r} is invalid; accepted: None, -1 "
                             f"(every position) or a token id >= 0")
        if self.returned_token_ids is not None:
            ids = self.returned_token_ids
            if (not isinstance(ids, (list, tuple)) or not ids
                    or not all(_is_int(i) and i >= 0 for i in ids)):
                raise ValueError(f"PoolingParams.returned_token_ids={ids!r} is invalid; accepted: None or a "
                                 f"non-empty list of column indices >= 0")
            self.returned_token_ids = list(ids)
        if not _is_int(self.first_position) or self.first_position < 0:
            raise ValueError(f"PoolingParams.first_position={self.first_position!r} is invalid; accepted: an int >= 0")
        if not isinstance(self.use_activation, bool):
            raise ValueError(f"PoolingParams.use_activation={self.use_activation!r} is invalid; accepted: a bool")


@dataclass
class PoolingOutput:
    data: torch.Tensor  # [num_pooled_positions, num_columns] float32


@dataclass
class PoolingRequestOutput:
    """vLLM's PoolingRequestOutput: `outputs.data` holds the pooled rows; `error` (prmkern's) is set when this
    request failed alone."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    error: str | None = None
    num_cached_tokens: int = 0
    pooled_positions: list[int] = field(default_factory=list)  # prompt positions of the rows of outputs.data


def default_step_tag_id(tokenizer: Any, vocab_size: int) -> int | None:
    """The id of `<extra_0>` in the tokenizer when it is one token there, else Qwen2.5-Math-PRM's 151651 when the
    vocabulary holds it, else None (every position is pooled)."""
    from prmkern.models.qwen2_prm import STEP_TAG, STEP_TAG_ID
    if tokenizer is not None:
        ids = tokenizer.encode(STEP_TAG, add_special_tokens=False)
        if len(ids) == 1:
            return ids[0]
    return STEP_TAG_ID if STEP_TAG_ID < vocab_size else None


def pooled_positions(prompt_token_ids: list[int], step_tag_id: int | None, first: int = 0) -> list[int]:
    if step_tag_id is None or step_tag_id == -1:
        return list(range(first, len(prompt_token_ids)))
    return [i for i, t in enumerate(prompt_token_ids) if t == step_tag_id and i >= first]


def record_rows(request: Any, first: int, rows: torch.Tensor) -> None:
    """rows [R, num_labels]: the head's rows for prompt positions first .. first + R - 1; keeps the pooled ones
    and moves request.pool_next past them."""
    end = first + rows.shape[0]
    for p in request.pool_positions:
        if first <= p < end:
            request.pooled[p] = rows[p - first].detach().float().cpu().clone()
    later = [p for p in request.pool_positions if p >= end]
    request.pool_next = later[0] if later else len(request.prompt_token_ids)


def pooling_output(request: Any, num_labels: int) -> PoolingRequestOutput:
    params: PoolingParams = request.pooling
    positions = [p for p in request.pool_positions if p in request.pooled]
    if request.error is None and len(positions) == len(request.pool_positions) and positions:
        data = torch.stack([request.pooled[p] for p in positions])  # [P, num_labels]
    else:
        data = torch.empty(0, num_labels)
    if params.returned_token_ids is not None:
        data = data[:, params.returned_token_ids]
    if params.use_activation and data.numel():
        data = torch.softmax(data, dim=-1)
    return PoolingRequestOutput(request.request_id, PoolingOutput(data), list(request.prompt_token_ids),
                                request.finished, request.error, request.num_cached_tokens or 0, positions)

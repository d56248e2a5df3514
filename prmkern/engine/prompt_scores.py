"""Prompt log-probabilities, recorded as prefill computes them: vLLM's prompt_logprobs (a {token_id: Logprob}-ready
record per prompt position, from prompt_logprobs_start on) and prompt_logprob_token_ids (per causal row from
prompt_logprob_start on, the log-probabilities of that row's own ids: a float32 [rows, ids] array).

A prompt position p >= 1 is scored by the logits row of position p - 1. The scheduler computes (rather than reads
from the prefix cache) every position from Request.prompt_lp_next - 1 on, so both kinds are filled, chunk by chunk,
by `record` (Request.__post_init__ sets prompt_lp_next and the NaN-filled array). Knows nothing of the
scheduler or the model.
"""
from __future__ import annotations

import torch

from prmkern.engine.sampler import position_logprobs, top_count
from prmkern.sampling_params import SamplingParams


def check_rows(params: SamplingParams, prompt_len: int, vocab: int) -> None:
    """vLLM's admission checks of prompt_logprob_token_ids: ids in the vocabulary, one row per scored position."""
    rows = params.prompt_logprob_token_ids
    if rows is None:
        return
    top = max(max(r) for r in rows)
    if top >= vocab:
        raise ValueError(f"prompt_logprob_token_ids contain out-of-vocab token ids (-1 pads a row). Vocabulary size: "
                         f"{vocab}")
    want = max(prompt_len - 1 - (params.prompt_logprob_start or 0), 0)
    if len(rows) != want:
        raise ValueError(f"prompt_logprob_token_ids has {len(rows)} rows, but the prompt has {want} scored rows "
                         f"(prompt_len - 1 - prompt_logprob_start).")


def record(request, first: int, logits: torch.Tensor) -> None:
    """logits [R, V]: rows for prompt positions first .. first + R - 1, each scoring the next prompt token."""
    params = request.params
    count = logits.shape[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    if params.prompt_logprobs is not None:
        lo = max(first, params.prompt_logprobs_start - 1)  # the first row whose next position is asked for
        if lo < first + count:
            ids = torch.tensor(request.prompt_token_ids[lo + 1:first + 1 + count], device=logits.device)
            lps = position_logprobs(logprobs[lo - first:], ids,
                                    [top_count(params.prompt_logprobs, logits.shape[-1])] * ids.shape[0])
            request.prompt_logprobs[lo + 1:lo + 1 + len(lps)] = lps
    if request.prompt_id_scores is not None:
        start = params.prompt_logprob_start or 0
        lo = max(first, start)
        if lo < first + count:
            ids = torch.tensor(params.prompt_logprob_token_ids[lo - start:first + count - start],
                               device=logits.device)  # [r, ids], -1 = padding
            scores = logprobs[lo - first:].gather(1, ids.clamp(min=0))
            scores = scores.masked_fill(ids < 0, float("-inf"))
            request.prompt_id_scores[lo - start:first + count - start] = scores.cpu()
    request.prompt_lp_next = first + 1 + count

"""Turns a step's logits into next tokens, one row per sequence, each with its own parameters and RNG.

Greedy rows take the argmax; others are scaled by temperature, filtered by top-k / top-p when asked (the sort is
skipped otherwise) and drawn with the sequence's own generator, so a seeded request reproduces its chains whatever
else is batched. Log-probabilities returned are of the model's distribution (before temperature and filtering).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prmkern.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # of the sampled token, where the request asked for it
    chosen_logprobs: list[dict[int, float] | None]  # of the request's logprob_token_ids


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [R, V]; top_k [R] (<= 0: off), top_p [R] -> logits with the filtered-out tokens at -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    rank = torch.arange(vocab, device=logits.device)[None, :]
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the first token is always kept).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits [R, V] float32, one row per sequence in `seqs`."""
        assert logits.shape[0] == len(seqs), f"{logits.shape[0]} logit rows for {len(seqs)} sequences"
        need_logprobs = any(s.params.logprobs or s.params.logprob_token_ids for s in seqs)
        logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None

        # min_tokens: EOS and stop tokens cannot end a chain before it has min_tokens tokens.
        for r, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                if banned:
                    logits[r, banned] = float("-inf")

        random_rows = [r for r, s in enumerate(seqs) if not s.params.greedy]
        # argmax only where some row is greedy: over a large vocabulary it is not free.
        tokens = (logits.argmax(dim=-1) if len(random_rows) < len(seqs)
                  else torch.zeros(len(seqs), dtype=torch.int64, device=logits.device))
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            # Every row sampling (the usual decode step): no gather. Every temperature 1: no division.
            scaled = logits if len(random_rows) == len(seqs) else logits[idx]
            temps = [seqs[r].params.temperature for r in random_rows]
            if any(t != 1.0 for t in temps):
                scaled = scaled / torch.tensor(temps, device=logits.device)[:, None]
            k_list = [seqs[r].params.top_k for r in random_rows]
            p_list = [seqs[r].params.top_p for r in random_rows]
            if any(k > 0 for k in k_list) or any(p < 1 for p in p_list):
                scaled = _apply_top_k_top_p(scaled, torch.tensor(k_list, device=logits.device),
                                            torch.tensor(p_list, device=logits.device))
            # Inverse-CDF draw: one uniform per row from the row's own generator, one batched search. The draw
            # scales the uniform by each row's total (cdf[:, -1], ~1 after rounding), so the CDF needs no renorm.
            cdf = torch.softmax(scaled, dim=-1).cumsum_(dim=-1).cpu()  # [R, V]
            u = torch.cat([torch.rand(1, generator=seqs[r].generator, dtype=torch.float64) for r in random_rows])
            target = (u * cdf[:, -1].double()).to(cdf.dtype)[:, None]
            drawn = torch.searchsorted(cdf, target, right=True)
            # u * total can round up to total in float32: never go past the last token with non-zero probability.
            last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
            drawn = torch.minimum(drawn, last)[:, 0]
            tokens[idx] = drawn.to(tokens.device)
        token_list = tokens.tolist()
        sampled_lp: list[float | None] = [None] * len(seqs)
        chosen: list[dict[int, float] | None] = [None] * len(seqs)
        if logprobs is not None:
            lp_cpu = logprobs.cpu()
            for r, seq in enumerate(seqs):
                if seq.params.logprobs:
                    sampled_lp[r] = float(lp_cpu[r, token_list[r]])
                ids = seq.params.logprob_token_ids
                if ids:
                    chosen[r] = dict(zip(ids, lp_cpu[r, ids].tolist()))
        return SampleResult(token_list, sampled_lp, chosen)

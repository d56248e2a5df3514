"""Turns a step's logits into next tokens, one row per sequence, each with its own parameters and RNG.

vLLM's order: (log-probabilities returned are taken here, from the raw logits) -> min_tokens bans -> penalties
(repetition, frequency, presence) -> greedy rows take the argmax; others are scaled by temperature, filtered by
min_p, then top-k / top-p when asked (the sort is skipped otherwise) and drawn with the sequence's own generator, so
a seeded request reproduces its chains whatever else is batched. A row whose logits hold NaN or +inf is reported as
failed (its request fails alone) instead of drawing a token id outside the vocabulary. With the C++ CPU kernels
(the `cpp` backend) the draw of rows without top-k / top-p / min-p is one call (csrc/sampling.cpp) on the same
per-row uniforms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch

from prmkern.engine.sequence import Sequence


@dataclass
class PositionLogprobs:
    """Log-probabilities at one position: the chosen token's (with its 1-based rank) and the k most likely."""
    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]
    # SamplingParams.logprob_token_ids: id -> (logprob, 1-based rank), shown in CompletionOutput.logprobs as vLLM does
    extra: dict[int, tuple[float, int]] = field(default_factory=dict)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # where the request asked for logprobs
    chosen_logprobs: list[dict[int, float] | None]  # of the request's logprob_token_ids
    failed: dict[int, str] = field(default_factory=dict)  # row -> why it could not be sampled


def position_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]) -> list[PositionLogprobs]:
    """logprobs [R, V] (log_softmax rows), token_ids [R] the chosen token per row, ks[r] the top count of row r.
    Ranks are vLLM's: the number of tokens whose logprob is >= the chosen one's (1 = the most likely)."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [R, 1]
    ranks = (logprobs >= chosen).sum(dim=-1).tolist()
    k_max = max(ks)
    top_lp, top_ids = (logprobs.topk(k_max, dim=-1) if k_max else (None, None))
    top_lp = top_lp.tolist() if top_lp is not None else None
    top_ids = top_ids.tolist() if top_ids is not None else None
    chosen_list = chosen[:, 0].tolist()
    ids = token_ids.tolist()
    return [PositionLogprobs(ids[r], chosen_list[r], ranks[r], top_ids[r][:k] if k else [],
                             top_lp[r][:k] if k else []) for r, k in enumerate(ks)]


def top_count(k: int | None, vocab: int) -> int:
    """SamplingParams.logprobs / prompt_logprobs as a count of top tokens: -1 is the whole vocabulary (vLLM's)."""
    return vocab if k == -1 else (k or 0)


def bad_word_bans(bad_words: list[list[int]], output_ids: list[int]) -> list[int]:
    """vLLM's bad_words rule: a word's last token is banned when the tokens generated so far end with the rest of
    the word (a one-token word is banned always). Only this chain's generated tokens count, not the prompt."""
    banned = []
    for word in bad_words:
        head = word[:-1]
        if len(head) > len(output_ids):
            continue
        if not head or output_ids[len(output_ids) - len(head):] == head:
            banned.append(word[-1])
    return banned


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


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [R, V] (temperature applied); min_p [R]: drop tokens less likely than min_p x the top token."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    repetition: list[float], frequency: list[float], presence: list[float]) -> torch.Tensor:
    """logits [R, V]; per row its prompt and output token ids and its three penalties (vLLM's definitions):
    repetition divides positive / multiplies negative logits of tokens in prompt or output; frequency subtracts
    penalty x output count; presence subtracts penalty for each token present in the output."""
    rows, vocab = logits.shape
    dev = logits.device
    # Built where the logits live; only the token ids travel.
    out_counts = torch.zeros(rows, vocab, dtype=logits.dtype, device=dev)
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=dev)
    for r in range(rows):
        if output_ids[r]:
            ids = torch.tensor(output_ids[r], dtype=torch.int64, device=dev)
            out_counts[r].index_add_(0, ids, torch.ones(len(output_ids[r]), dtype=logits.dtype, device=dev))
        seen[r, torch.tensor(prompt_ids[r], dtype=torch.int64, device=dev)] = True
    seen |= out_counts > 0
    rep = torch.tensor(repetition, dtype=logits.dtype, device=logits.device)[:, None]
    penalties = torch.where(seen, rep, torch.ones_like(logits))
    logits = torch.where(logits > 0, logits / penalties, logits * penalties)
    logits = logits - torch.tensor(frequency, dtype=logits.dtype, device=logits.device)[:, None] * out_counts
    return logits - torch.tensor(presence, dtype=logits.dtype, device=logits.device)[:, None] * (out_counts > 0)


def _draw_torch(scaled: torch.Tensor, u: torch.Tensor, temps: list[float], min_ps: list[float], top_ks: list[int],
                top_ps: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """scaled [R, V] logits of the sampled rows, u [R] float64 uniforms (one per row, from its own generator) ->
    (tokens [R], ok [R]: False where the row's softmax total is not finite and positive)."""
    dev = scaled.device
    if any(t != 1.0 for t in temps):  # every temperature 1 (the usual verifier setting): no division
        scaled = scaled / torch.tensor(temps, device=dev)[:, None]
    if any(m > 0 for m in min_ps):
        scaled = _apply_min_p(scaled, torch.tensor(min_ps, device=dev, dtype=scaled.dtype))
    if any(k > 0 for k in top_ks) or any(p < 1 for p in top_ps):
        scaled = _apply_top_k_top_p(scaled, torch.tensor(top_ks, device=dev), torch.tensor(top_ps, device=dev))
    # Inverse-CDF draw, one batched search. The draw scales the uniform by each row's total (cdf[:, -1], ~1 after
    # rounding), so the CDF needs no renorm.
    cdf = torch.softmax(scaled, dim=-1).cumsum_(dim=-1).cpu()  # [R, V]
    target = (u * cdf[:, -1].double()).to(cdf.dtype)[:, None]
    drawn = torch.searchsorted(cdf, target, right=True)
    # u * total can round up to total in float32: never go past the last token with non-zero probability.
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    total = cdf[:, -1]
    return torch.minimum(drawn, last)[:, 0], torch.isfinite(total) & (total > 0)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], cpu_kernels: ModuleType | None = None):
        """cpu_kernels: prmkern's C++ module (`prmkern._C`, the engine passes it with the `cpp` backend): CPU float32
        rows then draw in one C++ call (csrc/sampling.cpp) instead of softmax + cumsum + searchsorted in torch."""
        self.eos_token_ids = list(eos_token_ids)
        self.cpu_kernels = cpu_kernels

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits [R, V] float32, one row per sequence in `seqs`."""
        assert logits.shape[0] == len(seqs), f"{logits.shape[0]} logit rows for {len(seqs)} sequences"
        need_logprobs = any(s.params.logprobs is not None or s.params.logprob_token_ids for s in seqs)
        logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None

        # min_tokens: EOS and stop tokens cannot end a chain before it has min_tokens tokens.
        for r, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                if banned:
                    logits[r, banned] = float("-inf")
        for r, seq in enumerate(seqs):  # vLLM's allowed_token_ids, bad_words and logit_bias, before the penalties
            p = seq.params
            if seq.request.bad_words_token_ids:
                banned = bad_word_bans(seq.request.bad_words_token_ids, seq.output_token_ids)
                if banned:
                    logits[r, banned] = float("-inf")
            if p.has_logit_edits:
                if p.allowed_token_ids is not None:
                    keep = torch.tensor(p.allowed_token_ids, dtype=torch.int64, device=logits.device)
                    logits[r] = torch.full_like(logits[r], float("-inf")).index_copy_(0, keep, logits[r, keep])
                if p.logit_bias:
                    ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=logits.device)
                    logits[r, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype,
                                                   device=logits.device)
        pen_rows = [r for r, s in enumerate(seqs) if s.params.has_penalties]
        if pen_rows:
            ps = [seqs[r].params for r in pen_rows]
            logits[pen_rows] = apply_penalties(
                logits[pen_rows], [seqs[r].token_ids[:seqs[r].num_prompt_tokens] for r in pen_rows],
                [seqs[r].output_token_ids for r in pen_rows], [p.repetition_penalty for p in ps],
                [p.frequency_penalty for p in ps], [p.presence_penalty for p in ps])

        random_rows = [r for r, s in enumerate(seqs) if not s.params.greedy]
        # NaN or +inf in a row (-inf is a legitimate mask) makes its token meaningless: such a row fails alone. Found
        # without another pass over the vocabulary: argmax picks a NaN or +inf when the row has one (greedy rows),
        # and the softmax total of such a row is not finite (sampled rows).
        bad = torch.zeros(len(seqs), dtype=torch.bool)
        # argmax only where some row is greedy: over a large vocabulary it is not free.
        if len(random_rows) < len(seqs):
            tokens = logits.argmax(dim=-1)
            bad |= ~torch.isfinite(logits.gather(1, tokens[:, None])[:, 0]).cpu()
        else:
            tokens = torch.zeros(len(seqs), dtype=torch.int64, device=logits.device)
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            # Every row sampling (the usual decode step): no gather. Every temperature 1: no division.
            scaled = logits if len(random_rows) == len(seqs) else logits[idx]
            ps = [seqs[r].params for r in random_rows]
            temps = [p.temperature for p in ps]
            u = torch.cat([torch.rand(1, generator=seqs[r].generator, dtype=torch.float64) for r in random_rows])
            filtered = any(p.min_p > 0 or p.top_k > 0 or p.top_p < 1 for p in ps)
            if (self.cpu_kernels is not None and scaled.device.type == "cpu" and scaled.dtype == torch.float32
                    and scaled.stride(-1) == 1 and not filtered):
                # One C++ call: the same float32 division by the temperature, softmax weights and search.
                drawn, ok = self.cpu_kernels.sample_rows(
                    scaled, u, torch.tensor(temps, dtype=torch.float32) if any(t != 1.0 for t in temps) else None)
            else:
                drawn, ok = _draw_torch(scaled, u, temps, [p.min_p for p in ps], [p.top_k for p in ps],
                                        [p.top_p for p in ps])
            tokens[idx] = drawn.to(tokens.device)
            bad[random_rows] = ~ok.cpu()
        return self._finish(logprobs, seqs, tokens, bad)

    def _finish(self, logprobs: torch.Tensor | None, seqs: list[Sequence], tokens: torch.Tensor,
                bad: torch.Tensor) -> SampleResult:
        """Failed rows (non-finite logits) and the requested log-probabilities of the drawn tokens."""
        failed = {r: _nonfinite_message(seqs[r]) for r in bad.nonzero()[:, 0].tolist()}
        if failed:
            tokens[list(failed)] = 0  # a placeholder id: these rows' requests fail and their tokens are dropped
        token_list = tokens.tolist()
        sampled_lp: list[PositionLogprobs | None] = [None] * len(seqs)
        chosen: list[dict[int, float] | None] = [None] * len(seqs)
        if logprobs is not None:
            vocab = logprobs.shape[-1]
            lp_rows = [r for r, s in enumerate(seqs)
                       if (s.params.logprobs is not None or s.params.logprob_token_ids) and r not in failed]
            if lp_rows:
                sel = torch.tensor(lp_rows, device=logprobs.device)
                ks = [top_count(seqs[r].params.logprobs, vocab) for r in lp_rows]
                for r, pos in zip(lp_rows, position_logprobs(logprobs[sel], tokens[sel], ks)):
                    sampled_lp[r] = pos
            for r, seq in enumerate(seqs):
                ids = seq.params.logprob_token_ids
                if ids and r not in failed:
                    row = logprobs[r]  # [V]
                    values = row[torch.tensor(ids, device=row.device)]  # [len(ids)]
                    ranks = (row[None, :] >= values[:, None]).sum(dim=-1).tolist()  # vLLM's rank, 1 = most likely
                    chosen[r] = dict(zip(ids, values.tolist()))
                    sampled_lp[r].extra = {t: (lp, rank) for t, lp, rank in zip(ids, chosen[r].values(), ranks)}
        return SampleResult(token_list, sampled_lp, chosen, failed)


def _nonfinite_message(seq: Sequence) -> str:
    """Why a row could not be sampled: its logits were NaN / inf, from the model or from this request's own
    logit processing (a huge logit_bias or penalty overflows float32; allowed_token_ids with min_tokens can ban every
    token), which the message names when the request set any of them."""
    p = seq.params
    own = [name for name, on in (("logit_bias", bool(p.logit_bias)), ("allowed_token_ids", p.allowed_token_ids),
                                 ("repetition_penalty", p.repetition_penalty != 1.0),
                                 ("frequency_penalty", p.frequency_penalty != 0.0),
                                 ("presence_penalty", p.presence_penalty != 0.0), ("min_tokens", p.min_tokens > 0))
           if on]
    cause = (f"the model, or this request's {', '.join(own)} (a value that overflows float32, or that bans every "
             f"token)" if own else "the model")
    return f"non-finite logits (NaN or inf) at position {seq.num_tokens - 1} of this request, from {cause}"

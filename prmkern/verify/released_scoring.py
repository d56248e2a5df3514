"""Scoring modes: "released" (the arithmetic of the engine each release ran on) and "exact" (prmkern's own).

`released` is the default for the released formats (thinkprm, genprm, critic); `exact` for every other format.

* ThinkPRM (mukhal/ThinkPRM 0beccfb, prm/thinkprm_api.py) scores its final verdict with SGLang's `select()`
  (python/sglang/lang/backend/runtime_endpoint.py, RuntimeEndpoint.select): the state text s (prompt + chain +
  "\\nIs the solution correct? ") is tokenised as text (with special tokens added: a second BOS), P = its length;
  each choice c ("yes", "no") is tokenised as s + c, so the trailing space joins the label (" yes") and the choice
  is scored over the tokens from position max(P - 2, 0) on ("?" and " yes" for R1-Distill's tokenizer: token
  healing). The normalised log-probability is the mean of those tokens' prompt log-probabilities, skipping every
  value that is None or exactly 0.0 (`compute_normalized_prompt_logprobs` keeps `x[0]` only when truthy); when the
  first scored token's text is a suffix of s, it is taken out of the mean (no healing happened). thinkprm_api.py
  then takes softmax(normalised / decision_temperature)[0]: with one-token labels, sigma((lp(yes) - lp(no)) / 2),
  and sigma(lp(yes) - lp(no)) when lp("?") is exactly 0. Any exception there scores softmax([0, 1])[0] = 0.2689.
  `sglang_select_score` restates it.
* GenPRM (RyanLiu112/GenPRM 590bc94, genprm_inference.py `get_reward_score`) reads vLLM 0.7.1 V0's per-position
  `logprobs=20` dicts. That engine's sampler (vllm/model_executor/layers/sampler.py, `Sampler.forward`) computes the
  log-probabilities it returns after the logits are divided by the temperature and filtered by top-k, then top-p
  (`_apply_top_k_top_p`: top-k keeps the tokens >= the k-th largest logit; top-p masks, in ascending order, the
  tokens whose cumulative probability is <= 1 - p, never the largest): a filtered token has log-probability -inf.
  The dict holds the 20 most likely tokens (and the sampled one). The release's score at the decision token:
  p(Yes) / (p(Yes) + p(No)) from that dict; the other label, when absent from it, takes the dict's smallest
  probability; a zero denominator gives 0.5. `vllm_v0_processed` restates the processing on the raw top-k list the
  engine returns; `genprm_released_probability` the score.
* ProcessBench's critic reads no probability: both modes are the same there.

It does not run the model (protocols.py and genprm_protocol.py ask the engine for the log-probabilities) and holds
no prompt text (released_prompts.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["SCORING_MODES", "RELEASED_FORMATS", "default_scoring", "check_scoring", "sglang_select_score",
           "SGLANG_FAILED_SCORE", "vllm_v0_processed", "genprm_released_probability", "GENPRM_TOP_LOGPROBS"]

SCORING_MODES = ("released", "exact")
RELEASED_FORMATS = ("thinkprm", "genprm", "critic")
# thinkprm_api.py: a chain whose verdict raised scores softmax(np.array([0, 1]))[0].
SGLANG_FAILED_SCORE = 1.0 / (1.0 + math.e)
GENPRM_TOP_LOGPROBS = 20  # genprm_inference.py: SamplingParams(logprobs=20)


def default_scoring(format_name: str) -> str:
    """"released" for the released formats, "exact" for the others (the shipped verifier's and user formats)."""
    return "released" if format_name in RELEASED_FORMATS else "exact"


def check_scoring(scoring: object) -> str:
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring={scoring!r} is invalid; accepted: {' | '.join(SCORING_MODES)}")
    return scoring  # type: ignore[return-value]


def _normalised(entries: Sequence[tuple[float | None, str]], state_text: str) -> float:
    """RuntimeEndpoint.select's normalised prompt log-probability of one choice: entries are (logprob, token text)
    of the choice's tokens from max(P - 2, 0) on. ZeroDivisionError when every value is None or 0.0."""
    values = [lp for lp, _ in entries if lp]  # `if x[0]`: None and exactly 0.0 are both skipped
    norm = sum(values) / len(values)
    if entries and state_text.endswith(entries[0][1]):  # no healing: the first token is the prompt's own
        first = entries[0][0]
        # (norm * len(entries) - first) / (len(entries) - 1), with first as given (None fails as in Python)
        norm = (norm * len(entries) - first) / (len(entries) - 1)  # type: ignore[operator]
    return norm


def sglang_select_score(choices: Sequence[Sequence[tuple[float | None, str]]], state_text: str,
                        decision_temperature: float = 1.0, label_index: int = 0) -> float:
    """ThinkPRM's released verdict score: softmax over the choices' normalised log-probabilities (divided by
    decision_temperature), at label_index. A failure anywhere scores SGLANG_FAILED_SCORE, as the release's
    `except Exception` branch does."""
    try:
        norms = [_normalised(c, state_text) / decision_temperature for c in choices]
        top = max(norms)
        exps = [math.exp(v - top) for v in norms]
        return exps[label_index] / sum(exps)
    except (ZeroDivisionError, TypeError, ValueError, OverflowError):
        return SGLANG_FAILED_SCORE


def vllm_v0_processed(top: Mapping[int, float], chosen: Mapping[int, float], temperature: float, top_k: int,
                      top_p: float) -> dict[int, float]:
    """The {token id: log-probability} dict vLLM 0.7.1 V0 returns at one position for logprobs=len(top).

    top: the raw distribution's most likely tokens {id: raw logprob}, at least top_k of them when top_k > 0 (raw
    log-probabilities differ from the logits by one constant per position, which temperature scaling and both
    filters ignore); chosen: raw logprobs of further ids to report (the labels). Greedy (temperature ~ 0) is
    vLLM's temperature 1 without filters. Ids outside `top` are outside top-k when top_k <= len(top); with top_k
    off (<= 0) the renormalisation needs the full distribution, so only top_k > 0 or greedy is accepted here."""
    if temperature < 1e-5:  # vLLM: greedy rows use temperature 1, top_p 1, top_k off
        return {**{t: float(v) for t, v in top.items()}, **{t: float(v) for t, v in chosen.items()}}
    if top_k <= 0 or top_k > len(top):
        raise ValueError(f"released GenPRM scoring needs top_k in [1, {len(top)}] (the raw top list's length), "
                         f"got top_k={top_k}")
    ranked = sorted(top.items(), key=lambda kv: -kv[1])
    kth = ranked[top_k - 1][1]
    kept = [(t, v / temperature) for t, v in ranked if v >= kth]  # top-k keeps ties with the k-th value
    # top-p over the top-k set, ascending: drop while the cumulative probability stays <= 1 - p; the largest stays
    m = max(v for _, v in kept)
    z = sum(math.exp(v - m) for _, v in kept)
    asc = sorted(kept, key=lambda kv: kv[1])
    cum, survivors = 0.0, []
    for idx, (t, v) in enumerate(asc):
        cum += math.exp(v - m) / z
        if cum <= 1 - top_p and idx < len(asc) - 1:
            continue
        survivors.append((t, v))
    ms = max(v for _, v in survivors)
    lse = ms + math.log(sum(math.exp(v - ms) for _, v in survivors))
    alive = {t: v - lse for t, v in survivors}
    return {t: alive.get(t, -math.inf) for t in (*top, *chosen)}


def genprm_released_probability(processed: Mapping[int, float], listed_ids: Sequence[int], decision_id: int,
                                yes_id: int, no_id: int) -> float:
    """get_reward_score at the decision token. processed: vllm_v0_processed's dict; listed_ids: the ids vLLM's
    logprobs=20 dict held (the 20 most likely, plus the sampled decision token). The label not listed takes the
    smallest listed probability; a zero denominator gives 0.5."""
    listed = {t: processed[t] for t in (*listed_ids, decision_id)}
    other = no_id if decision_id == yes_id else yes_id
    p_dec = math.exp(listed[decision_id])
    p_other = math.exp(listed[other]) if other in listed else math.exp(min(listed.values()))
    p_yes, p_no = (p_dec, p_other) if decision_id == yes_id else (p_other, p_dec)
    den = p_yes + p_no
    return 0.5 if den == 0 else p_yes / den

"""Beam search with vLLM 0.32's names, shape and rule: `LLM.beam_search(prompts, BeamSearchParams(...))` returns one
`BeamSearchOutput` per prompt, whose `sequences` (best first, at most beam_width) carry `tokens`, `text`,
`cum_logprob` and per generated position `logprobs`.

The rule, as vLLM 0.32 runs it (vllm/entrypoints/generate/beam_search/offline.py, itself after transformers'):
each step, every live beam is extended by one token with SamplingParams(logprobs=2 * beam_width, max_tokens=1,
temperature); its candidates are the 2 * beam_width most likely next tokens plus the sampled one (one and the same
at temperature 0), each scored with the beam's cumulative log-probability plus the token's raw log-probability. A
candidate ending in EOS (unless ignore_eos) is set aside as completed, whatever its rank; the others are ranked by
`cum_logprob / len(tokens) ** length_penalty` (len counts the prompt's tokens too, as vLLM counts them, less a
final EOS) and the best beam_width live on. After max_tokens steps (or when no beam is live), completed and live
beams are ranked by the same key and the best beam_width are returned. As in vLLM, `tokens` holds the prompt and
the generated tokens and `text` decodes all of them.

Each step is an ordinary generate() call over the live beams: their prompts share KV blocks through the engine's
prefix cache, so a step computes about one new token per beam. This module knows nothing of the engine's insides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from prmkern.outputs import Logprob
from prmkern.prompts import encode_bounded, max_token_chars, split_prompt
from prmkern.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    """One beam (vLLM's fields): `tokens` are the prompt's and the generated ones; `logprobs` has one
    {token_id: Logprob} dict per generated position (the candidates the step offered); `text` is set on the
    returned beams only."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first; at most beam_width of them."""
    sequences: list[BeamSearchSequence]


def beam_score(tokens: Sequence[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float) -> float:
    """vLLM's ranking key: the cumulative log-probability over the length (prompt included, a final EOS not)
    raised to length_penalty."""
    length = len(tokens) - (1 if eos_token_id is not None and tokens and tokens[-1] == eos_token_id else 0)
    return cum_logprob / (max(length, 1) ** length_penalty)


def _prompt_ids(llm: Any, prompt: Any) -> list[int]:
    text, ids = split_prompt(prompt)
    if ids is not None:
        return ids
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("a text prompt needs a tokenizer and this LLM has none; pass token ids "
                         "({'prompt_token_ids': [...]})")
    return encode_bounded(tok, text, llm.engine.max_model_len - 1, max_token_chars(tok))


def _eos_token_id(llm: Any) -> int | None:
    """vLLM's: the tokenizer's eos_token_id (without a tokenizer, the model's first EOS id)."""
    tok = llm.get_tokenizer()
    if tok is not None and tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    eos = getattr(llm.engine, "eos_token_ids", ())
    return int(eos[0]) if eos else None


def beam_search(llm: Any, prompts: Sequence[Any], params: BeamSearchParams, use_tqdm: bool = False,
                concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
    """LLM.beam_search's body; see the module docstring for the rule."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if concurrency_limit is not None and (not isinstance(concurrency_limit, int) or isinstance(concurrency_limit, bool)
                                          or concurrency_limit < 1):
        raise ValueError(f"concurrency_limit={concurrency_limit!r} is invalid; accepted: None or an int >= 1")
    width, eos = params.beam_width, _eos_token_id(llm)

    def key(beam: BeamSearchSequence) -> float:
        return beam_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

    step_params = SamplingParams(logprobs=2 * width, max_tokens=1, temperature=params.temperature,
                                 ignore_eos=True, detokenize=False)
    live = [[BeamSearchSequence(tokens=_prompt_ids(llm, p))] for p in prompts]  # per prompt: its live beams
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    limit = concurrency_limit or max(1, len(prompts))
    bar = None
    if use_tqdm:
        from tqdm import tqdm
        bar = tqdm(total=params.max_tokens * -(-len(prompts) // limit), desc="beam search", unit="step")
    try:
        for start in range(0, len(prompts), limit):
            group = range(start, min(start + limit, len(prompts)))
            for _ in range(params.max_tokens):
                beams = [(i, b) for i in group for b in live[i]]
                if not beams:
                    break
                outs = llm.generate([{"prompt_token_ids": b.tokens} for _, b in beams], step_params, use_tqdm=False)
                extended: dict[int, list[BeamSearchSequence]] = {i: [] for i in group}
                for (i, beam), out in zip(beams, outs):
                    if out.error is not None:
                        raise ValueError(f"beam search, prompt {i}: {out.error}")
                    step = out.outputs[0].logprobs[0]  # {token_id: Logprob}: the top 2 * beam_width + the sampled
                    for token, lp in step.items():
                        child = BeamSearchSequence(tokens=beam.tokens + [token], logprobs=beam.logprobs + [step],
                                                   cum_logprob=beam.cum_logprob + lp.logprob)
                        if token == eos and not params.ignore_eos:
                            completed[i].append(child)
                        else:
                            extended[i].append(child)
                for i in group:
                    live[i] = sorted(extended[i], key=key, reverse=True)[:width]
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    tok = llm.get_tokenizer()
    outputs = []
    for i in range(len(prompts)):
        best = sorted(completed[i] + live[i], key=key, reverse=True)[:width]
        for beam in best:
            beam.text = tok.decode(beam.tokens, skip_special_tokens=params.skip_special_tokens) if tok else ""
        outputs.append(BeamSearchOutput(sequences=best))
    return outputs

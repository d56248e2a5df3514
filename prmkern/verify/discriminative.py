"""Discriminative PRMs (Qwen2.5-Math-PRM) behind the Verifier: one forward pass per solution, step rewards out.

The record renders as the format's conversation (formats.QWEN_PRM: the steps as the assistant turn, each closed by
`<extra_0>`); the engine's pooling (LLM.reward, prmkern/pooling.py) returns softmax(score head) at each separator,
and column 1 is the step's P(correct). Each record gets one Chain without text whose per-step VerdictScores carry
those probabilities (source "pooling", status correct / incorrect against the threshold), so the rows, the solution
score (`method`), the earliest error and the ProcessBench metrics are those of the generative formats. Solutions
of one problem share the problem's KV blocks (prefix cache). Like the generative protocols it is a coroutine
(continuous.py): its one round is a pooling Round, which run_rounds answers with LLM.reward.

It does not load models or sample: there is no chain to sample, so num_chains, temperature and max_tokens do not
apply (a configuration asking for more than one chain is refused).
"""
from __future__ import annotations

from typing import Any

from prmkern.pooling import PoolingParams
from prmkern.verify.continuous import Protocol, Round
from prmkern.verify.parsing import ParsedOutput
from prmkern.verify.scoring import ChainScores, VerdictScore, aggregate


def check_discriminative(verifier: Any) -> None:
    """ValueError unless the LLM is a pooling model and the configuration asks for what one pass gives."""
    engine = getattr(verifier.llm, "engine", None)
    if not getattr(engine, "is_pooling_model", False):
        raise ValueError(f"format {verifier.fmt.name!r} needs a discriminative PRM checkpoint (architecture "
                         f"Qwen2ForProcessRewardModel); this model generates: use a generative format")
    if verifier.config.num_chains != 1:
        raise ValueError(f"num_chains={verifier.config.num_chains} is invalid for format {verifier.fmt.name!r}: "
                         f"a discriminative PRM scores a solution in one forward pass; accepted: 1")
    if verifier.config.method in ("final", "vote"):
        raise ValueError(f"method={verifier.config.method!r} is invalid for format {verifier.fmt.name!r}; "
                         f"accepted: min, last, mean, product")
    if engine.step_tag_id is None:
        raise ValueError("the tokenizer has no single-token step separator <extra_0>")


def step_chain(probs: list[float], threshold: float, fmt_name: str) -> ChainScores:
    steps = [VerdictScore(i, "correct" if p >= threshold else "incorrect", p, "pooling")
             for i, p in enumerate(probs)]
    return ChainScores(steps, ParsedOutput(format=fmt_name, steps=[]))


def run_discriminative(verifier: Any, jobs: list[tuple[Any, str, list[str]]], results: Any) -> Protocol:
    """The protocol coroutine (continuous.py): one pooling round, every record's rendered solution in it."""
    from prmkern.verify.protocols import Chain
    fmt, tok, c = verifier.fmt, verifier.tok, verifier.config
    prompts, kept = [], []
    for i, problem, steps in jobs:
        if any(fmt.step_template.replace("{text}", "") in s for s in steps):
            results[i].error = f"a step contains the step separator {fmt.step_template.replace('{text}', '')!r}"
            continue
        prompts.append(verifier.encode(fmt.render(problem, steps, tok)))
        kept.append((i, steps))
    outs = (yield Round(prompts, [None] * len(prompts), pooling=PoolingParams())) if prompts else []
    for (i, steps), out in zip(kept, outs):
        res = results[i]
        if out.error is not None:
            res.error = out.error
            continue
        data = out.outputs.data  # [num_separators, 2]
        if data.shape[0] != len(steps):
            res.error = (f"the rendered solution has {data.shape[0]} step separators for {len(steps)} steps "
                         f"(the tokenizer must keep <extra_0> as one token)")
            continue
        chain = Chain()
        chain.scores = step_chain(data[:, 1].tolist(), c.threshold, fmt.name)
        res.chains.append(chain)
        res.scores = aggregate([chain.scores], len(steps), method=c.method, threshold=c.threshold)

"""Several verifiers' protocols on one engine, their rounds merged into one engine call each.

An ensemble's members on one checkpoint (prmkern/cli/ensemble.py) would otherwise run one after another: member 2
starts once member 1's last chain ends, so the engine decodes one member's chains at a time and a member's tail (its
few longest chains) runs at a batch of a few rows. `verify_together(verifiers, records)` starts every member's
protocol coroutine (protocols.Verifier.protocol, the one verify() drives) and, each time all of them have yielded
their next round, runs those rounds as one `llm.generate` (or `llm.reward`) call: the members' chains decode in the
same engine steps, and prompts that coincide share their blocks within the batch (the scheduler reads blocks that
an earlier row of the same step computes). A member's results do not depend on the others: every chain samples
from its own seeded RNG, the seeds are each verifier's own, and an early-exit watch sees only its own requests
(the merged watch maps request indices back). Rounds with a pooling model (qwen-prm) merge into one reward call.

It does not combine scores (verify/ensemble.py) or read files and options (cli/ensemble.py).
"""
from __future__ import annotations

from typing import Any, Sequence

from prmkern.sampling_params import SamplingParams
from prmkern.verify.continuous import Round

__all__ = ["run_merged", "verify_together"]


def run_merged(llm: Any, protocols: Sequence[Any]) -> None:
    """Drives protocol coroutines to their ends, each step of the loop one generate call holding every live
    protocol's generation round (and one reward call for their pooling rounds)."""
    live: dict[int, Round] = {}
    for k, protocol in enumerate(protocols):
        try:
            live[k] = next(protocol)
        except StopIteration:
            pass
    while live:
        outs: dict[int, list] = {}
        # A round with an early-exit watch runs in a call of its own, as verify() runs it: where the watch cuts a
        # chain depends on which engine step it looks after, which depends on what else is in the batch.
        for k, r in live.items():
            if r.pooling is None and r.watch is not None:
                outs[k] = list(llm.generate(r.prompts, r.params, use_tqdm=False, watch=r.watch)) if r.prompts else []
        gen = [k for k, r in live.items() if r.pooling is None and r.watch is None]
        pool = [k for k, r in live.items() if r.pooling is not None]
        if gen:
            prompts, params, spans = [], [], []  # spans: (protocol, first request, requests)
            for k in gen:
                r = live[k]
                spans.append((k, len(prompts), len(r.prompts)))
                prompts += list(r.prompts)
                params += [r.params] * len(r.prompts) if isinstance(r.params, SamplingParams) else list(r.params)
            res = llm.generate(prompts, params, use_tqdm=False) if prompts else []
            for k, off, n in spans:
                outs[k] = list(res[off:off + n])
        if pool:
            prompts, pparams, spans = [], [], []
            for k in pool:
                r = live[k]
                spans.append((k, len(prompts), len(r.prompts)))
                prompts += list(r.prompts)
                pparams += list(r.pooling) if isinstance(r.pooling, (list, tuple)) else [r.pooling] * len(r.prompts)
            res = llm.reward(prompts, pparams, use_tqdm=False) if prompts else []
            for k, off, n in spans:
                outs[k] = list(res[off:off + n])
        for k in list(live):
            try:
                live[k] = protocols[k].send(outs[k])
            except StopIteration:
                del live[k]


def verify_together(verifiers: Sequence[Any], records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """What [v.verify(records) for v in verifiers] returns, every verifier on the same LLM, their rounds merged."""
    if not verifiers:
        return []
    llm = verifiers[0].llm
    if any(v.llm is not llm for v in verifiers):
        raise ValueError("verify_together needs verifiers on one LLM (members on one checkpoint)")
    all_results, protocols = [], []
    for v in verifiers:  # as Verifier.verify prepares its records (a malformed record fails alone)
        results, jobs = v.prepare_records(records)
        all_results.append(results)
        protocols.append(v.protocol(jobs, results))
    run_merged(llm, protocols)
    metrics = getattr(getattr(llm, "engine", None), "metrics", None)  # prmkern:verifications, _chains
    if metrics is not None:
        for results in all_results:
            done = [r for r in results if r.error is None]
            metrics.count_verifications(len(done), sum(len(r.chains) for r in done))
    return all_results

"""Streamed step verdicts: a verification that hands out what it knows while its chains are still generating.

`stream_verify(verifier, records)` (also `Verifier.stream(records)`) runs the records on the verifier's engine with
continuous batching (continuous.ContinuousRunner, one protocol per record, seeded as Verifier.verify seeds them)
and yields, after every engine step, the events of that step, each a dict with the record's index as "solution":

* {"type": "step", "step": j, "p_correct": [P | None | "pending" per chain], "mean": m, "pending": u,
  "settled": "correct" | "error" | "unscored" | None} whenever a chain gives its verdict on step j (per_step
  formats; early_exit.RecordWatch.step_event): None is a verdict that cannot be scored, "pending" a chain that has
  not judged the step yet; `mean` is the running mean over the chains that scored it; `settled` is what the bounds
  of early_exit.py already decide about the step whatever the pending chains write;
* {"type": "decided", "earliest_error": j | -1 | None, "chains_given": [...]}: once the solution's earliest error
  is settled (with stop_at_first_error its remaining chains are aborted at this point; a search can drop it);
* {"type": "result", "result": VerificationResult}: the solution's final result, as Verifier.verify computes it.

A search prunes through `drops`: a set the caller adds solution indices to while it iterates. At the next engine step
a listed solution whose earliest error is decided has its chains aborted (their blocks freed; a listed solution
not yet decided is aborted when it is), its later rounds (budget forcing, the forced final verdict) are skipped,
and its result is the one stop_at_first_error gives (the steps up to the decided one judged, `stopped_at` set);
the other solutions go on in the same batch, unaffected (each chain has its own seeded RNG).

GenPRM (per_paragraph) yields only "result" events. Closing the generator early aborts the requests in flight.
It does not serialise events (the server's SSE does: serve/verify_api.py) or write files.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterator, Sequence

from prmkern.verify.continuous import ContinuousRunner

__all__ = ["stream_verify"]


def stream_verify(verifier: Any, records: Sequence[dict[str, Any]], max_chains: int = 64,
                  drops: set | None = None) -> Iterator[dict]:
    from prmkern.verify.protocols import VerificationResult
    engine = getattr(getattr(verifier.llm, "_llm", verifier.llm), "engine", None)
    if engine is None or not hasattr(engine, "add_request"):
        raise TypeError(f"streamed verdicts need a prmkern LLM (its engine is stepped here), got "
                        f"{type(verifier.llm).__name__}")
    events: deque = deque()
    config = verifier.config

    def start_of(i: int, rec: Any) -> tuple[Any, Any, Any]:
        rid = rec.get("id", i) if isinstance(rec, dict) else i
        results: dict[int, VerificationResult] = {}

        def start() -> Any:
            problem, steps = verifier.prepare(rec)
            results[i] = VerificationResult(rid, len(steps), None, [], scoring=config.scoring)
            return verifier.protocol([(i, problem, steps)], results)

        def done(error: BaseException | None) -> None:
            res = results.get(i) or VerificationResult(rid, 0, None, [], scoring=config.scoring)
            if error is not None:
                res.error = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            events.append({"solution": i, "type": "result", "result": res})
        return i, start, done

    runner = ContinuousRunner(engine, max_chains=max(max_chains, config.num_chains),
                              chains_per_record=config.num_chains)
    previous, verifier.on_event = verifier.on_event, events.append
    previous_drops, verifier.drop_keys = verifier.drop_keys, drops
    try:
        for _ in runner.iterate(start_of(i, rec) for i, rec in enumerate(records)):
            while events:
                yield events.popleft()
        while events:
            yield events.popleft()
    finally:
        verifier.on_event, verifier.drop_keys = previous, previous_drops

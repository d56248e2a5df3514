"""The one driver of the engine's step loop: `generate` (and `encode`, its pooling twin) runs requests to completion,
`step` runs one step.

Everything that steps an engine goes through here: `LLM.generate` (its progress bar is a per-step callback), the
command line's chain progress (prmkern/cli/verify.py, another callback) and the server's loop thread
(prmkern/serve/engine_loop.py, which calls `step` between admitting and aborting requests). So a failing step is
handled the same everywhere: a step that raises fails the requests it was driving (finish_reason "error", their
blocks freed) and the engine lives on; a FatalEngineError (no step can run again, e.g. a dead tensor-parallel rank)
reaches the caller; an interrupt (KeyboardInterrupt) aborts the call's requests so none outlives it.
Knows nothing of tokenizers, progress bars or HTTP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from prmkern.engine.engine import FatalEngineError
from prmkern.outputs import RequestOutput
from prmkern.sampling_params import SamplingParams

OnStep = Callable[[list[Any]], None]  # called after each step with the sequences that step finished
# watch(i, chains) -> True aborts request i (its unfinished chains end "abort", blocks freed): stop at the first error
Watch = Callable[[int, list[Any]], bool]


@dataclass
class StepResult:
    finished: list[Any] = field(default_factory=list)  # sequences this step finished
    error: Exception | None = None  # what the step raised, if it did (its requests are then failed by the caller)

    @property
    def fatal(self) -> bool:
        return isinstance(self.error, FatalEngineError)

    def message(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


def step(engine: Any) -> StepResult:
    """One engine step. An exception of the step is returned, not raised: the caller decides whom it fails."""
    try:
        return StepResult(engine.step())
    except Exception as e:  # noqa: BLE001 - classified by the caller (fatal or not)
        return StepResult(error=e)


def fail(engine: Any, requests: Sequence[Any], message: str) -> None:
    """Fails the unfinished `requests` with `message` (finish_reason "error") and aborts them (blocks freed)."""
    engine._fail_requests({r for r in requests if not r.finished}, message)
    for r in requests:
        engine.abort_request(r)


def apply_watch(engine: Any, requests: Sequence[Any], watch: Watch) -> list[Any]:
    """Calls watch(i, request.seqs) for each unfinished request; aborts those it returns True for. Returns the
    sequences that ended by it."""
    ended: list[Any] = []
    for i, r in enumerate(requests):
        if not r.finished and watch(i, r.seqs):
            live = [s for s in r.seqs if not s.finished]
            if engine.abort_request(r):
                ended += live
    return ended


def run(engine: Any, requests: Sequence[Any], on_step: OnStep | None = None, watch: Watch | None = None) -> None:
    """Steps `engine` until it has no unfinished work; on_step(finished sequences) after every step. A failed step
    fails `requests` and ends the run (the engine stays usable); a FatalEngineError is raised. watch: see Watch."""
    while engine.has_unfinished():
        result = step(engine)
        if result.error is not None:
            if result.fatal:  # no later call can run either: the caller must see it
                raise result.error
            fail(engine, requests, f"the engine step failed: {result.message()}")
            return
        finished = result.finished
        if watch is not None:
            finished = finished + apply_watch(engine, requests, watch)
        if on_step is not None:
            on_step(finished)
    if watch is not None:  # a last look at every request, its chains as they ended (streamed verdicts)
        for i, r in enumerate(requests):
            watch(i, r.seqs)


def generate(engine: Any, prompts: Sequence[Any], params: Sequence[SamplingParams],
             on_step: OnStep | None = None, watch: Watch | None = None) -> list[RequestOutput]:
    """Adds one request per (prompt, params), runs them to completion and returns their outputs in order. A prompt
    that cannot run comes back with `.error` set; anything raised (KeyboardInterrupt included) first aborts every
    request of this call."""
    requests: list[Any] = []
    try:
        for p, sp in zip(prompts, params):
            requests.append(engine.add_request(p, sp))
        run(engine, requests, on_step, watch)
    except BaseException:
        for r in requests:
            engine.abort_request(r)
        raise
    return [engine.output(r) for r in requests]


def encode(engine: Any, prompts: Sequence[Any], pooling: Sequence[Any],
           on_step: OnStep | None = None) -> list[Any]:
    """generate() for a pooling model: one request per (prompt, PoolingParams), nothing sampled; returns their
    PoolingRequestOutputs in order (the same failure and interrupt rules)."""
    requests: list[Any] = []
    try:
        for p, pp in zip(prompts, pooling):
            requests.append(engine.add_request(p, None, pooling=pp))
        run(engine, requests, on_step)
    except BaseException:
        for r in requests:
            engine.abort_request(r)
        raise
    return [engine.pooling_output(r) for r in requests]

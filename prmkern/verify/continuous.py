"""Continuous verification across records: the engine stays full while records come and go.

A verification protocol (protocols.Verifier.protocol, GenPRM's run_paragraphs) is a coroutine: it yields a `Round`
(prompts, sampling params, an optional early-exit watch) and gets back one RequestOutput per prompt (a pooling
round, a discriminative PRM's: one PoolingRequestOutput per prompt). `run_rounds`
drives one coroutine with `llm.generate`, one call per round (what Verifier.verify does for a batch of records).
`ContinuousRunner` drives one coroutine per record over one engine: it admits records while fewer than
`max_chains` chains are in flight, steps the engine, applies each round's watch after every step, and when all of a
record's requests in a round have finished sends their outputs back, so the record's next round (budget forcing,
the forced final verdict, GenPRM's next stage) joins the running batch at once. A record whose protocol ends is
handed to `on_result` right away; records finish in any order.

A record's sampling does not depend on what else runs: each chain has its own seeded RNG, and the seeds come from
the record's key (the caller keeps them equal to the batch-synchronous path's). It does not write files or know the
CLI's rows; prmkern/cli/verify.py does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator

__all__ = ["Round", "run_rounds", "ContinuousRunner"]


@dataclass
class Round:
    prompts: list
    params: list
    watch: Any = None  # early_exit.ChainWatch: after each step, True aborts that request
    pooling: Any = None  # PoolingParams: a discriminative PRM's round (params unused; PoolingRequestOutputs back)


Protocol = Generator[Round, list, None]


def run_rounds(llm: Any, protocol: Protocol) -> None:
    """Runs a protocol coroutine to its end with llm.generate, one call per round."""
    try:
        rnd = next(protocol)
        while True:
            if rnd.pooling is not None:
                outs = llm.reward(rnd.prompts, rnd.pooling, use_tqdm=False)
            elif rnd.watch is None:
                outs = llm.generate(rnd.prompts, rnd.params, use_tqdm=False)
            else:
                outs = llm.generate(rnd.prompts, rnd.params, use_tqdm=False, watch=rnd.watch)
            rnd = protocol.send(outs)
    except StopIteration:
        pass


@dataclass(eq=False)
class _Live:
    key: Any
    protocol: Protocol
    done: Callable[[BaseException | None], None]  # called once when the protocol ends (None) or raises
    round: Round | None = None
    requests: list = field(default_factory=list)


class ContinuousRunner:
    """One engine, many records' protocols at once (see the module docstring)."""

    def __init__(self, engine: Any, max_chains: int, chains_per_record: int = 1,
                 on_step: Callable[[list], None] | None = None):
        """A record is admitted while the chains in flight plus its first round's `chains_per_record` fit in
        `max_chains` (or when nothing else runs). on_step(sequences): after every engine step, with the sequences
        that step finished or a watch aborted (progress)."""
        if max_chains < 1:
            raise ValueError(f"max_chains={max_chains} is invalid; accepted: an int >= 1")
        self.engine = engine
        self.max_chains = max_chains
        self.chains_per_record = chains_per_record
        self.live: list[_Live] = []
        self.peak_chains = 0
        self.on_step = on_step

    def chains_in_flight(self) -> int:
        n = 0
        for lv in self.live:
            for r in lv.requests:
                if not r.finished:
                    n += r.params.n - sum(1 for s in r.seqs if s.finished)
        return n

    def run(self, starts: Iterable[tuple[Any, Callable[[], Protocol], Callable[[BaseException | None], None]]]) -> None:
        """starts: (key, start, done) per record, in admission order; start() builds the record's protocol;
        done(error) is called when the record's protocol ends (error: what it raised, or None)."""
        for _ in self.iterate(starts):
            pass

    def iterate(self, starts: Iterable[tuple[Any, Callable[[], Protocol], Callable[[BaseException | None], None]]]
                ) -> Iterator[None]:
        """run(), yielding after every engine step (streaming.py hands out the events of the step); closing the
        iterator aborts the requests in flight."""
        from prmkern.engine.engine import FatalEngineError
        queue: Iterator = iter(starts)
        nxt = next(queue, None)
        try:
            while True:
                while nxt is not None and (not self.live or self.chains_in_flight() + self.chains_per_record
                                           <= self.max_chains):
                    key, start, done = nxt
                    nxt = next(queue, None)
                    try:
                        protocol = start()
                    except Exception as e:  # noqa: BLE001 - this record fails alone
                        done(e)
                        continue
                    self._advance(_Live(key, protocol, done), None)
                if not self.live:
                    if nxt is None:
                        return
                    yield
                    continue
                self.peak_chains = max(self.peak_chains, self.chains_in_flight())
                finished: list = []
                try:
                    finished = list(self.engine.step() or [])
                except FatalEngineError:
                    raise
                except Exception as e:  # noqa: BLE001 - outside what a step attributes: the live requests fail
                    reqs = {r for lv in self.live for r in lv.requests}
                    self.engine._fail_requests(reqs, f"the engine step failed: {type(e).__name__}: {e}")
                for lv in list(self.live):
                    if lv.round is not None and lv.round.watch is not None:
                        for i, r in enumerate(lv.requests):
                            if not r.finished and lv.round.watch(i, r.seqs):
                                live = [sq for sq in r.seqs if not sq.finished]
                                if self.engine.abort_request(r):
                                    finished += live
                    if all(r.finished for r in lv.requests):
                        if lv.round is not None and lv.round.watch is not None:
                            for i, r in enumerate(lv.requests):  # a last look: chains that ended in this step
                                lv.round.watch(i, r.seqs)
                        if lv.round.pooling is not None:
                            outs = [self.engine.pooling_output(r) for r in lv.requests]
                        else:
                            outs = [self.engine.output(r) for r in lv.requests]
                        self._advance(lv, outs)
                if self.on_step is not None:
                    self.on_step(finished)
                yield
        except BaseException:
            for lv in self.live:  # interrupted or fatal: nothing of it outlives the call
                for r in lv.requests:
                    self.engine.abort_request(r)
            self.live = []
            raise

    def _advance(self, lv: _Live, outs: list | None) -> None:
        """Sends a finished round's outputs (None: starts the protocol); submits its next round or ends it."""
        if lv in self.live:
            self.live.remove(lv)
        try:
            rnd = next(lv.protocol) if outs is None else lv.protocol.send(outs)
        except StopIteration:
            lv.done(None)
            return
        except Exception as e:  # noqa: BLE001 - the record's own failure (e.g. its sandbox): it fails alone
            lv.done(e)
            return
        lv.round = rnd
        extra = {} if rnd.pooling is None else {"pooling": rnd.pooling}
        lv.requests = [self.engine.add_request(p, sp, **extra) for p, sp in zip(rnd.prompts, rnd.params)]
        if not lv.requests:  # an empty round: answer it at once
            self._advance(lv, [])
            return
        self.live.append(lv)

"""Continuous verification across records: the same rows as the batch-synchronous groups (same seeds), each row
emitted as its record finishes, more chains per decode step, at most batch_size x K chains in flight, and a record
whose protocol raises failing alone."""
from __future__ import annotations

import json
import os

import pytest

from prmkern.cli.jobs import Item
from prmkern.cli.verify import verify_continuous, verify_rows
from prmkern.sampling_params import SamplingParams
from prmkern.verify.continuous import ContinuousRunner, Round
from prmkern.verify.protocols import Verifier, VerifyConfig
from tests.conftest import SHIPPED

def items(n: int) -> list[Item]:
    with open(os.path.join(SHIPPED, "examples.jsonl")) as f:
        recs = [json.loads(line) for line in f][:n]
    return [Item(i, i + 1, r) for i, r in enumerate(recs)]


def run_groups(llm, config, its, size):
    rows = {}
    v = Verifier(llm, config)
    for g in range(0, len(its), size):
        verify_rows(v, its[g:g + size], lambda i, row: rows.__setitem__(i, row), llm.tokenizer, True, size)
    return rows


@pytest.mark.parametrize("stop", [False, True])
def test_same_rows_as_batch_synchronous_groups_and_fuller_steps(shipped_llm, stop):
    its, size = items(4), 2
    config = VerifyConfig(format="prmkern", num_chains=2, temperature=1.0, seed=5, stop_at_first_error=stop)
    shipped_llm.reset_stats()
    want = run_groups(shipped_llm, config, its, size)
    sync = shipped_llm.stats.as_dict()
    shipped_llm.reset_stats()
    order, got = [], {}

    def emit(i, row):
        order.append(i)
        got[i] = row
    chains = verify_continuous(Verifier(shipped_llm, config), its, emit, shipped_llm.tokenizer, True, size)
    cont = shipped_llm.stats.as_dict()
    assert sorted(order) == list(range(4)) and chains == 4 * 2
    for i in range(4):
        w, g = want[i], got[i]
        assert g["prediction"] == w["prediction"] and g["verdict_counts"] == w["verdict_counts"]
        assert g["step_scores"] == pytest.approx(w["step_scores"], abs=1e-6)
        assert g.get("stopped_at") == w.get("stopped_at")
    assert cont["generated_tokens"] == sync["generated_tokens"]  # the same chains, token for token
    assert cont["decode_steps"] <= sync["decode_steps"], (cont, sync)


class FakeRequest:
    def __init__(self, length: int, n: int):
        self.params = type("P", (), {"n": n})()
        self.length, self.steps = length, 0
        self.seqs = [type("S", (), {"finished": False})() for _ in range(n)]
        self.aborted = False

    @property
    def finished(self) -> bool:
        return self.aborted or self.steps >= self.length


class FakeEngine:
    """Requests whose chains all run prompt[0] steps; counts steps and the most chains any step ran."""

    def __init__(self):
        self.requests, self.steps, self.widest = [], 0, 0

    def add_request(self, prompt, params):
        r = FakeRequest(prompt[0], params.n)
        self.requests.append(r)
        return r

    def step(self):
        live = [r for r in self.requests if not r.finished]
        self.steps += 1
        self.widest = max(self.widest, sum(r.params.n for r in live))
        for r in live:
            r.steps += 1
            if r.finished:
                for s in r.seqs:
                    s.finished = True
        return []

    def output(self, r):
        return r.length

    def abort_request(self, r):
        r.aborted = True


def protocol(lengths: list[int], n: int, seen: list):
    for length in lengths:  # one round per entry, each a request of n chains running `length` steps
        out = yield Round([[length]], [SamplingParams(n=n)])
        seen.append(out)


def test_runner_admits_records_as_chains_end_and_keeps_the_bound():
    # Records of 2 chains running 10, 2, 2, 2 steps; room for 4 chains. Batch-synchronous pairs take 10 + 2 steps;
    # here the short records follow one another beside the long one: 10 steps, never more than 4 chains.
    engine, done, seen = FakeEngine(), [], []
    runner = ContinuousRunner(engine, max_chains=4, chains_per_record=2)
    runner.run((k, lambda n=length: protocol([n], 2, seen), lambda e, k=k: done.append((k, e)))
               for k, length in enumerate([10, 2, 2, 2]))
    assert engine.steps == 10 and engine.widest == 4 and runner.peak_chains == 4
    assert done == [(1, None), (2, None), (3, None), (0, None)]  # in the order they finish
    assert sorted(seen) == [[2], [2], [2], [10]]


def test_runner_sends_each_round_its_outputs_and_fails_a_record_alone():
    engine, done, seen = FakeEngine(), [], []

    def broken():
        yield Round([[1]], [SamplingParams(n=1)])
        raise RuntimeError("sandbox down")
    runner = ContinuousRunner(engine, max_chains=8, chains_per_record=1)
    runner.run([(0, lambda: protocol([3, 1, 2], 1, seen), lambda e: done.append((0, e))),
                (1, broken, lambda e: done.append((1, e)))])
    assert seen == [[3], [1], [2]]  # one round after another, each answered with its outputs
    assert [k for k, _ in done] == [1, 0] and "sandbox down" in str(done[0][1]) and done[1][1] is None


def test_chains_in_flight_bounded_and_a_failing_record_fails_alone(shipped_llm, monkeypatch):
    from prmkern.verify import continuous
    its = items(4)
    peaks = []
    original = continuous.ContinuousRunner.run

    def run(self, starts):
        try:
            return original(self, starts)
        finally:
            peaks.append((self.peak_chains, self.max_chains))
    monkeypatch.setattr(continuous.ContinuousRunner, "run", run)
    bad = Item(4, 5, {"problem": "x", "steps": ["a"]})
    config = VerifyConfig(format="prmkern", num_chains=2, seed=1)
    v = Verifier(shipped_llm, config)
    original_protocol = Verifier.protocol

    def protocol(self, jobs, results):
        if jobs[0][1] == "x":
            raise RuntimeError("this record's protocol broke")
        return original_protocol(self, jobs, results)
    monkeypatch.setattr(Verifier, "protocol", protocol)
    rows = {}
    verify_continuous(v, its + [bad], lambda i, row: rows.__setitem__(i, row), shipped_llm.tokenizer, True, 2)
    assert sorted(rows) == list(range(5))
    assert "this record's protocol broke" in rows[4]["error"]
    assert all(rows[i]["error"] is None and rows[i]["prediction"] is not None for i in range(4))
    peak, cap = peaks[0]
    assert 2 < peak <= cap == 4

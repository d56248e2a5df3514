"""The one step driver (prmkern/engine/driver.py) behind LLM.generate and the command line's chain progress: a step
that raises fails the call's requests and the engine goes on; a FatalEngineError reaches the caller; an interrupt
aborts the call's requests; the per-step callback sees every finished sequence once."""
from __future__ import annotations

import pytest

from prmkern import LLM, SamplingParams
from prmkern.cli.verify import ChainProgress
from prmkern.engine import driver
from prmkern.engine.engine import FatalEngineError


class Bar:
    def __init__(self):
        self.postfix = []

    def set_postfix_str(self, text):
        self.postfix.append(text)


@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, device="cpu", num_kvcache_blocks=64, block_size=8)


def _breaking(engine, monkeypatch, error: Exception, after: int = 1):
    real, calls = engine.step, {"n": 0}

    def step():
        calls["n"] += 1
        if calls["n"] == after:
            raise error
        return real()
    monkeypatch.setattr(engine, "step", step)


PARAMS = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("caller", ["llm", "chain_progress"])
def test_a_failed_step_fails_the_call_and_the_engine_goes_on(llm, monkeypatch, caller):
    want = llm.generate([[3, 4, 5], [6, 7]], PARAMS, use_tqdm=False)
    bar = Bar()
    front = llm if caller == "llm" else ChainProgress(llm, bar)
    _breaking(llm.engine, monkeypatch, RuntimeError("boom"), after=2)
    outs = front.generate([[3, 4, 5], [6, 7]], [PARAMS, PARAMS], use_tqdm=False)
    assert [o.error for o in outs] == ["the engine step failed: RuntimeError: boom"] * 2
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    monkeypatch.undo()
    again = front.generate([[3, 4, 5], [6, 7]], [PARAMS, PARAMS], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]
    if caller == "chain_progress":
        assert bar.postfix[-1] == "10 tokens, 2/2 chains done"  # 2 prompts x max_tokens 5


@pytest.mark.parametrize("caller", ["llm", "chain_progress"])
def test_fatal_errors_and_interrupts_reach_the_caller_and_abort_the_call(llm, monkeypatch, caller):
    front = llm if caller == "llm" else ChainProgress(llm, Bar())
    for error in (FatalEngineError("rank 1 died"), KeyboardInterrupt()):
        _breaking(llm.engine, monkeypatch, error)
        with pytest.raises(type(error)):
            front.generate([[3, 4, 5]], [PARAMS], use_tqdm=False)
        monkeypatch.undo()
        assert not llm.engine.has_unfinished() and not llm.engine.requests


def test_the_callback_sees_each_finished_sequence_once(llm):
    seen = []
    params = [SamplingParams(n=2, max_tokens=3 + i, temperature=1.0, top_k=1, ignore_eos=True) for i in range(3)]
    outs = driver.generate(llm.engine, [[3, 4], [5, 6], [7, 8]], params, lambda finished: seen.extend(finished))
    assert len(seen) == 6 and len({id(s) for s in seen}) == 6
    assert sorted(len(s.output_token_ids) for s in seen) == [3, 3, 4, 4, 5, 5]
    assert [len(c.token_ids) for o in outs for c in o.outputs] == [3, 3, 4, 4, 5, 5]

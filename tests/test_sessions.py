"""Forkable verification sessions against whole-solution runs (verify()) on fresh engines: exact equality where the
protocol allows it (GenPRM: every step; qwen-prm: every step; ThinkPRM-style per-step formats: the first step),
forks equal to unforked sessions, eviction that changes cost and not results, and close() releasing every pin."""
from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest

from prmkern import LLM
from prmkern.verify.formats import PRMKERN
from prmkern.verify.protocols import Verifier, VerifyConfig
from prmkern.verify.sessions import SessionClosed, SessionLimits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIER = os.path.join(ROOT, "prmkern", "data", "verifier")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(VERIFIER, "model.safetensors")),
                                reason="no shipped verifier")


@pytest.fixture(scope="module")
def records():
    with open(os.path.join(VERIFIER, "examples.jsonl")) as f:
        return [json.loads(line) for line in f][:3]


def fresh() -> LLM:
    return LLM(VERIFIER, device="cpu", dtype="float32")


def fake_runner(items):
    """A deterministic stand-in for the sandbox: prints the snippet's length."""
    return [SimpleNamespace(status="ok", stdout=str(len(code)), stderr="") for _, code in items]


def rows(result, tok) -> dict:
    """verify()'s row without the record id (a session's is its index)."""
    out = result.to_json(tok, include_chains=True)
    out.pop("id")
    return out


GENPRM = dict(format="genprm", scoring="exact", num_chains=2, temperature=0.6, top_p=0.95, top_k=20, max_tokens=40,
              max_code_rounds=1, code_runner=fake_runner)


def test_genprm_session_equals_whole_solution(records):
    rec = records[0]
    whole_llm = fresh()
    whole = Verifier(whole_llm, VerifyConfig(**GENPRM)).verify([rec])[0]
    llm = fresh()
    session = Verifier(llm, VerifyConfig(**GENPRM)).open(rec["problem"])
    for k, step in enumerate(rec["steps"]):
        verdict = session.add_step(step)
        assert verdict.step == k and len(verdict.p_correct) == 2
    assert rows(session.result(), llm.tokenizer) == rows(whole, whole_llm.tokenizer)
    # Paragraph p's conversation came from the cache: far fewer tokens prefilled than submitted.
    assert llm.stats.prefill_tokens < 0.5 * llm.stats.prompt_tokens, llm.stats
    assert llm.stats.generated_tokens == whole_llm.stats.generated_tokens


def test_genprm_forks_equal_whole_runs(records):
    rec = records[1]
    alt = rec["steps"][:1] + ["Compute 1 + 1 = 3."]
    wholes = {}
    for name, steps in (("same", rec["steps"][:2]), ("alt", alt)):
        llm = fresh()
        wholes[name] = rows(Verifier(llm, VerifyConfig(**GENPRM)).verify([dict(rec, steps=steps)])[0], llm.tokenizer)
    llm = fresh()
    root = Verifier(llm, VerifyConfig(**GENPRM)).open(rec["problem"])
    root.add_step(rec["steps"][0])
    a, b = root.fork(), root.fork()
    verdicts = root.manager.add_steps([(a, rec["steps"][1]), (b, alt[1])])  # siblings in one engine batch
    root.add_step(rec["steps"][1])
    assert [v.step for v in verdicts] == [1, 1]
    assert rows(a.result(), llm.tokenizer) == rows(root.result(), llm.tokenizer) == wholes["same"]
    assert rows(b.result(), llm.tokenizer) == wholes["alt"]


def test_qwen_prm_session_equals_whole_solution(tmp_path):
    from prmkern.tiny import build_prm_checkpoint
    path = build_prm_checkpoint(str(tmp_path / "prm"), seed=5)
    steps = ["13 minus 5 is 8.", "8 plus 10 is 19.", "So the answer is 19."]
    whole = Verifier(LLM(path, device="cpu", dtype="float32"), VerifyConfig(format="qwen-prm")).verify(
        [{"problem": "What is 13 - 5 + 10?", "steps": steps}])[0]
    llm = LLM(path, device="cpu", dtype="float32")
    session = Verifier(llm, VerifyConfig(format="qwen-prm")).open("What is 13 - 5 + 10?")
    got = [session.add_step(s).score for s in steps]
    ref = [s.score for s in whole.scores.steps]
    assert got == pytest.approx(ref, abs=1e-6)
    assert session.result().prediction == whole.prediction
    # Each step prefilled its own tokens and a partial block, not the whole prompt again.
    assert llm.stats.cached_tokens > 0 and llm.stats.prefill_tokens < llm.stats.prompt_tokens


PER_STEP = dict(format="prmkern", num_chains=3, temperature=0.6, max_tokens=200)
# The shipped verifier's format with ThinkPRM's stops ("Step {n+1}:", "Is the solution correct?"), which a session
# round always uses: with them a session's first step is the whole-solution run of the one-step record.
STEP_STOP = dataclasses.replace(PRMKERN, name="prmkern-step-stop", step_stop_template="Step {n}:",
                                stop=("Is the solution correct?",))


def test_per_step_first_step_equals_whole_and_chains_extend(records):
    rec = records[0]
    whole_llm = fresh()
    one = dict(rec, steps=rec["steps"][:1])
    config = dict(PER_STEP, format=STEP_STOP)
    whole = Verifier(whole_llm, VerifyConfig(**config)).verify([one])[0]
    llm = fresh()
    session = Verifier(llm, VerifyConfig(**config)).open(rec["problem"])
    session.add_step(rec["steps"][0])
    assert rows(session.result(), llm.tokenizer) == rows(whole, whole_llm.tokenizer)
    before = [llm.tokenizer.decode(t.token_ids) for t in session.state.bodies]
    generated = llm.stats.generated_tokens
    v = session.add_step(rec["steps"][1])
    after = [llm.tokenizer.decode(t.token_ids) for t in session.state.bodies]
    for b, a in zip(before, after):
        # The chain is carried up to where it would judge step 2, never regenerated.
        cuts = [i for i in (b.find("Step 2:"), b.find("Is the solution correct?")) if i >= 0]
        kept = b[:min(cuts)] if cuts else b
        assert a.startswith(kept) and a[len(kept):].lstrip("\n").startswith("Step 2:"), (b, a)
    assert len(v.p_correct) == 3 and len(session.result().scores.steps) == 2
    assert llm.stats.generated_tokens - generated < 3 * PER_STEP["max_tokens"]


def test_per_step_fork_eviction_and_close(records):
    rec = records[2]
    llm = fresh()
    verifier = Verifier(llm, VerifyConfig(**PER_STEP))
    root = verifier.open(rec["problem"])
    root.add_step(rec["steps"][0])
    child = root.fork()
    root.add_step(rec["steps"][1])
    child.add_step(rec["steps"][1])
    assert rows(child.result(), llm.tokenizer) == rows(root.result(), llm.tokenizer)
    # The same steps under a one-session limit on a fresh engine: sessions get evicted, results do not change.
    llm2 = fresh()
    tight = Verifier(llm2, VerifyConfig(**PER_STEP))
    tight.sessions.limits = SessionLimits(max_sessions=1, max_pinned_blocks=10_000)
    r2 = tight.open(rec["problem"])
    r2.add_step(rec["steps"][0])
    c2 = r2.fork()
    r2.add_step(rec["steps"][1])
    c2.add_step(rec["steps"][1])
    assert tight.sessions.evictions >= 1 and len(tight.sessions.pinned) == 1
    assert rows(c2.result(), llm2.tokenizer) == rows(child.result(), llm.tokenizer)
    bm = llm.engine.block_manager
    assert verifier.sessions.pinned_blocks > 0
    for s in (root, child):
        s.close()
    assert bm.num_free_blocks == bm.num_blocks and verifier.sessions.pinned_blocks == 0
    with pytest.raises(SessionClosed):
        root.add_step("more")


def test_a_fork_is_a_use_of_its_parent(records):
    """Under the LRU limit, forking a session counts as using it: the root of several forks outlives an older
    session nobody touched since (before, the root stayed least recently used and was evicted first)."""
    rec = records[0]
    llm = fresh()
    verifier = Verifier(llm, VerifyConfig(format="prmkern", num_chains=1, max_tokens=16))
    manager = verifier.sessions
    manager.limits = SessionLimits(max_sessions=6, max_pinned_blocks=10_000)
    root = verifier.open(rec["problem"])
    root.add_step(rec["steps"][0])
    other = verifier.open(rec["problem"], index=1)
    other.add_step(rec["steps"][0])
    forks = [root.fork() for _ in range(3)]
    assert len(manager.pinned) == 5 and manager.evictions == 0
    newer = [verifier.open(rec["problem"], index=2 + k) for k in range(2)]
    for s in newer:  # the first reaches the limit of 6, the second passes it: one session is unpinned
        s.add_step(rec["steps"][0])
    assert manager.evictions == 1 and other.evicted and other.sid not in manager.pinned
    assert not root.evicted and root.sid in manager.pinned and len(manager.pinned) == 6
    for s in [root, other, *forks, *newer]:
        s.close()
    bm = llm.engine.block_manager
    assert manager.pinned_blocks == 0 and bm.num_free_blocks == bm.num_blocks


def test_a_step_past_the_context_fails_its_session_alone(records):
    """In one add_steps batch, a session whose verifier prompt is past the context (1,024 tokens) is closed with
    the engine's reason and the others get their normal verdicts (before: the batch raised, closing them all)."""
    rec, too_long = records[0], "1 + 1 " * 600
    config = VerifyConfig(format="prmkern", num_chains=2, max_tokens=96)
    alone_llm = fresh()
    alone = Verifier(alone_llm, config).open(rec["problem"])
    alone.add_step(rec["steps"][0])
    llm = fresh()
    verifier = Verifier(llm, config)
    a, b = verifier.open(rec["problem"]), verifier.open(rec["problem"], index=1)
    out = verifier.sessions.add_steps([(a, rec["steps"][0]), (b, too_long)])
    assert out[0].error is None and rows(a.result(), llm.tokenizer) == rows(alone.result(), alone_llm.tokenizer)
    assert out[1].error.startswith("step 1: prompt has") and "max_model_len" in out[1].error, out[1].error
    assert b.closed and b.error == out[1].error and out[1].score is None
    assert b.result().error == b.error and b.result().scores is None  # as verify() reports a failed record
    child = a.fork()
    with pytest.raises(RuntimeError, match=r"step 2: prompt has .*\(max_model_len\)"):
        child.add_step(too_long)  # a later step alone: add_step raises, the parent goes on
    assert child.closed and not a.closed and a.add_step(rec["steps"][1]).error is None
    for s in (a, alone):
        s.close()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_block_budget_and_bad_input(records):
    rec = records[0]
    llm = fresh()
    verifier = Verifier(llm, VerifyConfig(**PER_STEP))
    verifier.sessions.limits = SessionLimits(max_pinned_blocks=0)
    s = verifier.open(rec["problem"])
    s.add_step(rec["steps"][0])
    assert s.evicted and verifier.sessions.pinned_blocks == 0
    with pytest.raises(ValueError, match="non-empty"):
        s.add_step("  ")
    with pytest.raises(ValueError, match="earliest error"):
        Verifier(llm, VerifyConfig(format="critic")).open("x")
    with pytest.raises(ValueError, match="max_sessions"):
        SessionLimits(max_sessions=0)

"""Search pruning on streamed verdicts (prmkern/verify/pruning.py): best-of-N and beam search with prune pick what
the unpruned search picks (same seeds, the shipped verifier), the dropped candidates' chains are really aborted
(engine counters, fewer generated tokens, blocks back), and options that cannot prune fail clearly."""
from __future__ import annotations

import json
import os

import pytest

from prmkern import LLM, SamplingParams
from prmkern.verify.protocols import Verifier, VerifyConfig
from prmkern.verify.pruning import Bounds, verify_pruned
from prmkern.verify.search import beam_search, best_of_n

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "prmkern", "data", "verifier")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model.safetensors")),
                                reason="no shipped verifier")


@pytest.fixture(scope="module")
def llm():
    return LLM(SHIPPED, device="cpu", dtype="float32", num_kvcache_blocks=2048)


def held_out(n: int) -> list[dict]:
    """The shipped verifier's held-out examples whose steps are all correct, as problems with a reference solution
    (the replay generator's sample 0 is that solution, sample j changes one digit of step (j - 1) % steps)."""
    with open(os.path.join(SHIPPED, "examples.jsonl")) as f:
        ex = [json.loads(line) for line in f]
    return [{"problem": e["problem"], "solution": "\n\n".join(e["steps"]), "answer": e["answer"]}
            for e in ex if e["label"] == -1][:n]


def config(**kw) -> VerifyConfig:
    return VerifyConfig(format="prmkern", num_chains=4, seed=3, **kw)


def replay(llm, problems):
    from benchmarks.bench_search_sessions import ReplayGenerator
    return ReplayGenerator(llm.tokenizer, problems, 4)


@pytest.fixture(scope="module")
def unpruned(llm):
    problems = held_out(2)
    return problems, best_of_n(replay(llm, problems), Verifier(llm, config()), problems, n=4)


@pytest.mark.parametrize("rule", ["exact", "error"])
def test_pruned_best_of_n_chooses_as_the_full_run(llm, unpruned, rule):
    problems, full = unpruned
    pruned = best_of_n(replay(llm, problems), Verifier(llm, config()), problems, n=4, prune=rule)
    thr = config().threshold
    assert sum(r.pruned for r in pruned) > 0  # the case prunes something
    provable = 0
    for f, p in zip(full, pruned):
        assert p.pruned == sum(c.pruned for c in p.candidates)
        for fc, pc in zip(f.candidates, p.candidates):
            assert fc.text == pc.text
            if pc.pruned:  # dropped only for a decided error: the full run finds the same one, below threshold
                assert pc.earliest_error == fc.earliest_error and fc.earliest_error >= 0
                assert fc.score < thr and pc.score < thr
                if rule == "exact":  # dropped only once a sibling is known to score strictly above it
                    assert f.chosen.score > fc.score
            else:  # the survivors' verification is the full run's (same seeds; float rounding of other batches)
                assert pc.earliest_error == fc.earliest_error
                assert pc.score == pytest.approx(fc.score, rel=1e-4, abs=1e-7)
        if rule == "exact" or f.chosen.score >= thr:
            provable += 1
            assert f.candidates.index(f.chosen) == p.candidates.index(p.chosen)
        assert not p.chosen.pruned or all(c.pruned for c in p.candidates if c.score is not None)
    assert provable >= 1


def test_pruning_aborts_chains_and_frees_blocks(llm):
    """The same streamed run with and without dropping: the dropped solutions' requests are aborted (engine counter),
    their chains are shorter, fewer tokens are generated, every block comes back, and the others are unchanged."""
    e = held_out(2)[1]
    from benchmarks.bench_search_sessions import ReplayGenerator
    steps = e["solution"].split("\n\n")
    records = [{"problem": e["problem"], "steps": [ReplayGenerator.perturb(s, 1 if i == k else 0)
                                                   for i, s in enumerate(steps)]} for k in range(-1, len(steps))]
    verifier = Verifier(llm, config())
    engine = llm.engine
    free0 = engine.block_manager.num_free_blocks
    runs = {}
    for rule in (None, "error"):
        tokens0, aborted0 = engine.stats.generated_tokens, engine.stats.aborted_requests
        run = verify_pruned(verifier, records, [0] * len(records), rule)
        runs[rule] = (run, engine.stats.generated_tokens - tokens0, engine.stats.aborted_requests - aborted0)
        assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == free0
    (base, base_tokens, base_aborted), (cut, cut_tokens, cut_aborted) = runs[None], runs["error"]
    assert not any(base.dropped) and base_aborted == 0
    assert any(cut.dropped) and cut_aborted == sum(r.stopped_at is not None for r in cut.results) > 0
    assert cut_tokens < base_tokens
    for b, c, dropped in zip(base.results, cut.results, cut.dropped):
        assert b.prediction == c.prediction
        lengths = [sum(len(t.token_ids) for t in ch.turns) for ch in c.chains]
        if dropped and c.stopped_at is not None:  # aborted at its decided error: the chains stop short
            assert c.stopped_at == c.prediction >= 0
            assert sum(lengths) < sum(sum(len(t.token_ids) for t in ch.turns) for ch in b.chains)
        elif not dropped:
            assert c.scores.score == pytest.approx(b.scores.score, rel=1e-4, abs=1e-7)


def test_pruned_best_of_n_with_a_tiny_generator(llm, qwen2_dir):
    """A tiny random model writes the candidates (its own tokenizer); pruned and unpruned pick the same."""
    gen = LLM(qwen2_dir, device="cpu")
    problems = [{"problem": "What is 1 + 1?", "answer": "2"}, {"problem": "What is 2 * 3?", "answer": "6"}]
    params = SamplingParams(max_tokens=16, seed=0)
    out = {}
    for prune in (False, True):
        verifier = Verifier(llm, config(max_tokens=96))
        out[prune] = best_of_n(gen, verifier, problems, n=3, params=params, prune=prune)
    for f, p in zip(out[False], out[True]):
        assert [c.text for c in f.candidates] == [c.text for c in p.candidates]
        assert f.candidates.index(f.chosen) == p.candidates.index(p.chosen)


def test_pruned_beam_search_keeps_the_unpruned_beams(llm):
    problems = held_out(3)[1:]
    gen = replay(llm, problems)
    found = 0
    for prob in problems:
        res = {}
        for prune in (False, True):
            res[prune] = beam_search(gen, Verifier(llm, config()), prob["problem"], beam_width=1, expand=3,
                                     max_steps=3, prune=prune)
        full, cut = res[False], res[True]
        assert [c.text for c in full.candidates] == [c.text for c in cut.candidates]
        for a, b in zip(full.candidates, cut.candidates):
            assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-7)
        assert full.chosen.text == cut.chosen.text and full.pruned == 0
        found += cut.pruned
    assert found > 0


def test_pruned_best_of_n_on_sessions_marks_what_it_stopped(llm):
    """Sessions prune (a running minimum below the best finished score): the stopped candidates are marked `pruned`
    and counted as without sessions (before: none was marked), and the choice is the unpruned sessions' one."""
    from benchmarks.bench_search_sessions import ReplayGenerator
    from tests.test_search_hostile_inputs import FixedGenerator
    ex = held_out(3)
    problems = [{"problem": e["problem"]} for e in ex]
    texts = []
    for e in ex:  # one single-step candidate finishes first; the longer ones may be stopped behind it
        steps = e["solution"].split("\n\n")
        texts.append([steps[0]] + ["\n\n".join(steps[:-1] + [ReplayGenerator.perturb(steps[-1], j)])
                                   for j in range(3)])
    out = {}
    for prune in (False, True):
        gen = FixedGenerator(llm.tokenizer, texts)
        out[prune] = best_of_n(gen, Verifier(llm, config()), problems, n=4, sessions=True, prune=prune)
    assert sum(r.pruned for r in out[True]) > 0  # the case prunes something
    for full, cut in zip(out[False], out[True]):
        assert full.pruned == 0 and cut.pruned == sum(c.pruned for c in cut.candidates)
        assert full.candidates.index(full.chosen) == cut.candidates.index(cut.chosen) and not cut.chosen.pruned
        for c in cut.candidates:
            assert c.pruned == (len(c.step_scores) < len(c.steps)), (c.pruned, c.step_scores, c.steps)
            if c.pruned:  # stopped at a running minimum below a finished sibling's score: it could not win
                assert c.score < cut.chosen.score


def test_bounds_follow_the_step_events():
    b = Bounds(3, 4)
    assert b.upper() == 1.0 and b.lower() is None
    b.update({"step": 0, "p_correct": [0.9, 0.7, "pending", None], "pending": 1})
    assert b.upper() == pytest.approx((1.6 + 1) / 3) and b.lower() == 0.0  # steps 1, 2 may still score 0
    for j in (1, 2):
        b.update({"step": j, "p_correct": [0.8, 0.6, 0.9, 0.9], "pending": 0})
    assert b.lower() == pytest.approx(1.6 / 3) and b.upper() == pytest.approx(0.8)
    b.update({"step": 2, "p_correct": [None, None, None, None], "pending": 0})  # unscored for good: skipped
    assert b.lower() == pytest.approx(1.6 / 3) and b.upper() == pytest.approx(0.8)


def test_options_that_cannot_prune_fail_clearly(llm, qwen2_dir):
    problems = [{"problem": "What is 1 + 1?"}]
    v = Verifier(llm, config())
    cases = [(dict(select="vote", prune=True), "select='score' only"),
             (dict(prune="sometimes"), "accepted: False, True"),
             (dict(sessions=True, prune="error"), "prune=True")]
    for kw, words in cases:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            best_of_n(llm, v, problems, n=2, **kw)
    for cfg, words in ((config(method="mean"), "method 'min'"), (config(stop_at_first_error=True), "use one"),
                       (config(budget_tokens=16), "budget forcing"), (config(chains_min=2), "fixed chain count"),
                       (VerifyConfig(format="genprm", num_chains=1, scoring="exact"), "step-verdict format")):
        with pytest.raises(ValueError, match=words):
            best_of_n(llm, Verifier(llm, cfg), problems, n=2, prune=True)
    with pytest.raises(ValueError, match="sessions=False"):
        beam_search(llm, v, "What is 1 + 1?", sessions=True, prune=True)
    with pytest.raises(ValueError, match="accepted: True"):
        beam_search(llm, v, "What is 1 + 1?", prune="error")
    assert not llm.engine.has_unfinished()


def _main(*args: str) -> tuple[int, str]:
    """The CLI in this process: exit code, stderr (these errors come before any model loads)."""
    import contextlib
    import io

    from prmkern.cli import main
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def test_bon_cli_refuses_prune_with_what_cannot_prune(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"problem": "What is 1 + 1?"}) + "\n")
    for extra, words in ((["--select", "vote"], "--prune applies to --select score only"),
                         (["--stop-at-first-error"], "--prune and --stop-at-first-error do not go together"),
                         (["--method", "mean"], "--method 'mean'"), (["--format", "genprm"], "--format 'genprm'"),
                         (["--budget-tokens", "8"], "--budget-tokens"),
                         (["--chains-min", "2", "--chains", "8"], "--chains-min 2")):
        code, err = _main("bon", str(src), "--device", "cpu", "--prune", *extra)
        assert code == 2 and words in err and "Traceback" not in err, (extra, err)
    code, err = _main("bon", str(src), "--device", "cpu", "--prune", "sometimes")
    assert code == 2 and "--prune" in err and "exact" in err

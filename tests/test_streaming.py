"""Streamed step verdicts: the events Verifier.stream yields while chains generate agree with the final result
(each step's last event is its final score, made of the chains' own verdicts), come before the solution's result,
and the server sends the same as server-sent events ending with the non-streamed body."""
from __future__ import annotations

import json
import os

import pytest

from prmkern.verify.protocols import Verifier, VerifyConfig
from tests.conftest import SHIPPED

def records() -> list[dict]:
    with open(os.path.join(SHIPPED, "examples.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if r["label"] in (0, 1)][:2] + [r for r in recs if r["label"] == -1][:2]


def check_events(events: list[dict], results: list, num_chains: int) -> None:
    done = set()
    last: dict[tuple[int, int], dict] = {}
    for ev in events:
        i = ev["solution"]
        assert i not in done, f"an event of solution {i} after its result: {ev}"
        if ev["type"] == "step":
            assert len(ev["p_correct"]) == num_chains and ev["pending"] == ev["p_correct"].count("pending")
            scored = [p for p in ev["p_correct"] if p not in (None, "pending")]
            assert ev["mean"] == (pytest.approx(sum(scored) / len(scored), abs=1e-12) if scored else None)
            last[i, ev["step"]] = ev
        elif ev["type"] == "decided":
            assert ev["earliest_error"] == results[i].prediction
        else:
            assert ev["type"] == "result"
            done.add(i)
    assert done == set(range(len(results)))
    for i, res in enumerate(results):
        for j, st in enumerate(res.scores.steps):
            ev = last.get((i, j))
            if st.counts.get("not_judged"):  # stopped: no verdict was given on it
                continue
            assert ev is not None, (i, j)
            if ev["pending"] == 0:  # every chain judged it: its last event is its final score, chain by chain
                assert ev["mean"] == (None if st.score is None else pytest.approx(st.score, abs=1e-9))
                assert ev["p_correct"] == [pytest.approx(c.scores.steps[j].p_correct, abs=1e-9)
                                           if c.scores.steps[j].p_correct is not None else None
                                           for c in res.chains]


@pytest.mark.parametrize("stop", [False, True])
def test_stream_events_agree_with_the_result(shipped_llm, stop):
    config = VerifyConfig(format="prmkern", num_chains=4, seed=1, stop_at_first_error=stop)
    recs = records()
    events = list(Verifier(shipped_llm, config).stream(recs))
    results = [ev["result"] for ev in events if ev["type"] == "result"]
    results.sort(key=lambda r: recs.index(next(x for x in recs if x["id"] == r.record_id)))
    reference = Verifier(shipped_llm, config).verify(recs)
    assert [r.prediction for r in results] == [r.prediction for r in reference]
    assert sum(ev["type"] == "step" for ev in events) >= sum(len(r["steps"]) for r in recs)
    assert sum(ev["type"] == "decided" for ev in events) == len(recs)  # every solution settles (K=4, these sets)
    check_events(events, results, 4)


def test_closing_the_stream_aborts_its_requests(shipped_llm):
    stream = Verifier(shipped_llm, VerifyConfig(format="prmkern", num_chains=4, seed=1)).stream(records())
    first = next(stream)
    assert first["type"] in ("step", "decided", "result")
    stream.close()
    assert not shipped_llm.engine.has_unfinished()


def test_server_streams_verdicts_as_sse(shipped_llm):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from prmkern.serve.app import ServerConfig, build_app
    from prmkern.serve.background import serve_in_thread
    rec = records()[0]
    app = build_app(shipped_llm, ServerConfig(model_name="verifier",
                                              verify=VerifyConfig(format="prmkern", num_chains=3, seed=0)))
    body = {"problem": rec["problem"], "steps": rec["steps"]}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        plain = c.post("/v1/verify", json=body).json()
        with c.stream("POST", "/v1/verify", json={**body, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(x) for x in lines[:-1]]
    result = events[-1]
    assert result["type"] == "result"
    assert result["prediction"] == plain["prediction"]
    assert result["step_scores"] == pytest.approx(plain["step_scores"], abs=1e-9)
    steps = [ev for ev in events if ev["type"] == "step"]
    assert steps and all(ev["solution"] == 0 for ev in steps)
    for j, score in enumerate(plain["step_scores"]):  # each step's last event (all chains given) is its score
        final = [ev for ev in steps if ev["step"] == j and ev["pending"] == 0]
        assert final and final[-1]["mean"] == (None if score is None else pytest.approx(score, abs=1e-9))

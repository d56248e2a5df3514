"""/v1/sessions over a real HTTP client against a running server: each answer equals the Python session API
(prmkern/verify/sessions.py) on a fresh engine with the same seeds, exactly (concurrent sessions: to float32
rounding, see expect_step); concurrent steps of different sessions share engine steps; the session-count and pinned-KV limits evict cleanly; unknown ids are 404s saying why, bad
bodies 400s naming the field; a failing step closes its session alone and the server goes on."""
from __future__ import annotations

import dataclasses
import json
import os
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from prmkern import LLM  # noqa: E402
from prmkern.serve.app import ServerConfig, build_app  # noqa: E402
from prmkern.serve.background import serve_in_thread  # noqa: E402
from prmkern.verify.protocols import Verifier, VerifyConfig  # noqa: E402
from prmkern.verify.sessions import SessionLimits  # noqa: E402
from tests.test_server_load import SlowSteps, wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIER = os.path.join(ROOT, "prmkern", "data", "verifier")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(VERIFIER, "model.safetensors")),
                                reason="no shipped verifier")
CONFIG = VerifyConfig(format="prmkern", num_chains=3, temperature=0.6, max_tokens=160, seed=3)


@pytest.fixture(scope="module")
def records():
    with open(os.path.join(VERIFIER, "examples.jsonl")) as f:
        return [json.loads(line) for line in f][:3]


def fresh(path: str = VERIFIER) -> LLM:
    return LLM(path, device="cpu", dtype="float32")


def solution(result, tok) -> dict:
    """The result so far as a step's `solution` shows it (no chains, no id)."""
    out = result.to_json(tok, include_chains=False)
    out.pop("id")
    return out


def same(got, want, rel: float = 0.0):
    """got == want, floats within `rel` (relative) when rel > 0; containers compared element by element."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k], rel) for k in want)
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(
            same(g, w, rel) for g, w in zip(got, want))
    if isinstance(want, float) and rel > 0:
        return isinstance(got, float) and got == pytest.approx(want, rel=rel, abs=1e-12)
    return got == want


def expect_step(body: dict, verdict, tok, session, rel: float = 0.0) -> None:
    """rel 0: bit-for-bit. Concurrent sessions share engine steps, and a step's row count picks the GEMM (the
    decode GEMM up to prmkern.ops.cpp.CPP_MAX_ROWS rows, the blocked prefill GEMM above, which round float32 sums
    in a different order), so what ran beside another session's rows equals the sequential run to float32
    rounding of its log-probabilities: rel 1e-6 there."""
    assert body["object"] == "verification.session.step"
    assert (body["step"], body["verdicts"]) == (verdict.step, verdict.verdicts)
    assert same((body["score"], body["p_correct"]), (verdict.score, verdict.p_correct), rel), \
        ((body["score"], body["p_correct"]), (verdict.score, verdict.p_correct))
    want = solution(session.result(), tok)
    assert same(body["solution"], want, rel), (body["solution"], want)


def test_steps_forks_and_results_equal_the_python_api(records):
    rec, alt = records[0], "So 7 + 6 = 14."
    llm = fresh()
    root = Verifier(llm, CONFIG).open(rec["problem"], index=1)
    ref = {"r0": root.add_step(rec["steps"][0])}
    child = root.fork()
    ref["r1"] = root.add_step(rec["steps"][1])
    ref["c1"] = child.add_step(alt)
    assert ref["r1"].score is not None and any(p is not None for p in ref["c1"].p_correct)  # real verdicts

    served = fresh()
    app = build_app(served, ServerConfig(model_name="verifier", verify=CONFIG))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        opened = c.post("/v1/sessions", json={"problem": rec["problem"], "index": 1})
        assert opened.status_code == 200, opened.text
        sid = opened.json()["id"]
        assert opened.json()["format"] == "prmkern" and opened.json()["num_chains"] == 3
        r0 = c.post(f"/v1/sessions/{sid}/steps", json={"text": rec["steps"][0]})
        forked = c.post(f"/v1/sessions/{sid}/fork")
        cid = forked.json()["id"]
        r1 = c.post(f"/v1/sessions/{sid}/steps", json={"text": rec["steps"][1]})
        c1 = c.post(f"/v1/sessions/{cid}/steps", json={"text": alt})
        got_root, got_child = c.get(f"/v1/sessions/{sid}"), c.get(f"/v1/sessions/{cid}?include_chains=false")
        deleted = c.delete(f"/v1/sessions/{sid}")
        after_delete = c.get(f"/v1/sessions/{sid}")
        still = c.get(f"/v1/sessions/{cid}")
        unknown = c.post("/v1/sessions/vsess-nope/steps", json={"text": "x"})
        metrics = c.get("/metrics").text
        c.delete(f"/v1/sessions/{cid}")
        bm = served.engine.block_manager
        wait_until(lambda: bm.num_free_blocks == bm.num_blocks, what="every pin to be dropped")
    for got, name, session in ((r0, "r0", root), (r1, "r1", root), (c1, "c1", child)):
        assert got.status_code == 200, got.text
    tok = llm.tokenizer
    expect_step(r1.json(), ref["r1"], tok, root)
    expect_step(c1.json(), ref["c1"], tok, child)
    assert (r0.json()["step"], r0.json()["p_correct"]) == (0, ref["r0"].p_correct)
    assert forked.status_code == 200 and forked.json()["parent"] == sid and cid != sid
    whole = root.result().to_json(tok)
    whole.pop("id")
    body = got_root.json()
    assert body["steps"] == rec["steps"][:2] and body["index"] == 1 and body["parent"] is None
    assert {k: body[k] for k in whole} == whole  # chains included, text and all
    assert "chains" not in got_child.json() and got_child.json()["steps"] == [rec["steps"][0], alt]
    assert got_child.json()["parent"] == sid
    assert deleted.json() == {"id": sid, "object": "verification.session.deleted", "deleted": True}
    assert after_delete.status_code == 404 and "deleted" in after_delete.json()["error"]["message"]
    assert still.status_code == 200  # a fork outlives its parent
    assert unknown.status_code == 404 and "POST /v1/sessions" in unknown.json()["error"]["message"]
    # a session's id never becomes a label value: its paths are counted under "{id}"
    assert 'prmkern_http_requests_total{path="/v1/sessions/{id}/steps",status="200"} 3' in metrics
    assert 'prmkern_http_requests_total{path="/v1/sessions/{id}/steps",status="404"} 1' in metrics
    assert 'prmkern_http_requests_total{path="/v1/sessions/{id}",status="404"} 1' in metrics
    assert 'prmkern_request_latency_seconds_count{endpoint="session_step"} 3' in metrics


def test_bad_bodies_are_400s_naming_the_field(records):
    app = build_app(fresh(), ServerConfig(model_name="verifier", verify=CONFIG))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        sid = c.post("/v1/sessions", json={"problem": records[0]["problem"]}).json()["id"]
        answers = {
            "txt": c.post(f"/v1/sessions/{sid}/steps", json={"txt": "a"}),
            "int": c.post(f"/v1/sessions/{sid}/steps", json={"text": 5}),
            "empty": c.post(f"/v1/sessions/{sid}/steps", json={"text": "  "}),
            "notjson": c.post(f"/v1/sessions/{sid}/steps", content=b"{", headers={"content-type": "application/json"}),
            "index": c.post("/v1/sessions", json={"problem": "x", "index": -1}),
            "chains": c.post("/v1/sessions", json={"problem": "x", "num_chains": 0}),
            "critic": c.post("/v1/sessions", json={"problem": "x", "format": "critic"}),
            "unknown_format": c.post("/v1/sessions", json={"problem": "x", "format": "nope"}),
            "budget": c.post("/v1/sessions", json={"problem": "x", "budget_tokens": 10}),
            "noproblem": c.post("/v1/sessions", json={}),
        }
        ok = c.post(f"/v1/sessions/{sid}/steps", json={"text": records[0]["steps"][0]})  # the session still works
    for name, r in answers.items():
        assert r.status_code == 400, (name, r.text)
    msg = {k: r.json()["error"]["message"] for k, r in answers.items()}
    assert "unknown field 'txt'" in msg["txt"] and "accepted fields: text" in msg["txt"]
    assert msg["int"].startswith("text:") and answers["empty"].json()["error"]["param"] == "text"
    assert "not a JSON object" in msg["notjson"] and "accepted fields: text" in msg["notjson"]
    assert msg["index"].startswith("index:") and "num_chains=0" in msg["chains"] and "[1, " in msg["chains"]
    assert "has no sessions" in msg["critic"] and "per_step" in msg["critic"]
    assert "nope" in msg["unknown_format"] and answers["unknown_format"].json()["error"]["param"] == "format"
    assert "unknown field 'budget_tokens'" in msg["budget"] and "problem" in msg["noproblem"]
    assert ok.status_code == 200 and ok.json()["step"] == 0


def test_concurrent_sessions_share_engine_steps_and_equal_sequential_runs(records):
    refs = {}
    for n, rec in ((2, records[1]), (3, records[2])):
        llm = fresh()
        s = Verifier(llm, dataclasses.replace(CONFIG, num_chains=n)).open(rec["problem"])
        refs[n] = ([s.add_step(step) for step in rec["steps"][:2]], s, llm.tokenizer)
    served = fresh()
    slow = SlowSteps(served.engine, 0.005)  # both sessions' rounds surely overlap
    app = build_app(served, ServerConfig(model_name="verifier", verify=CONFIG))
    got: dict = {}
    with serve_in_thread(app) as url:
        def run(n: int, rec: dict) -> None:
            with httpx.Client(base_url=url, timeout=300) as c:
                sid = c.post("/v1/sessions", json={"problem": rec["problem"], "num_chains": n}).json()["id"]
                got[n] = [c.post(f"/v1/sessions/{sid}/steps", json={"text": step}) for step in rec["steps"][:2]]
        slow.record = True
        threads = [threading.Thread(target=run, args=a) for a in ((2, records[1]), (3, records[2]))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
    for n, (verdicts, session, tok) in refs.items():
        for r, v in zip(got[n], verdicts):
            assert r.status_code == 200, r.text
        expect_step(got[n][-1].json(), verdicts[-1], tok, session, rel=1e-6)
        assert same([r.json()["p_correct"] for r in got[n]], [v.p_correct for v in verdicts], rel=1e-6)
    # engine steps that ran chains of both sessions (2 and 3 chains per request) in one batch
    assert any(b >= {2, 3} for b in slow.batches), slow.batches[:20]


def test_limits_evict_cleanly_and_a_failing_step_fails_alone(records):
    rec = records[0]
    served = fresh()
    app = build_app(served, ServerConfig(model_name="verifier", verify=CONFIG, max_sessions=2,
                                         session_limits=SessionLimits(max_sessions=1)))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        a = c.post("/v1/sessions", json={"problem": rec["problem"]}).json()["id"]
        b = c.post("/v1/sessions", json={"problem": rec["problem"], "index": 2}).json()["id"]
        c.post(f"/v1/sessions/{a}/steps", json={"text": rec["steps"][0]})
        step_b = c.post(f"/v1/sessions/{b}/steps", json={"text": rec["steps"][0]})
        a_state = c.get(f"/v1/sessions/{a}?include_chains=false").json()  # unpinned by b's pins, still valid
        third = c.post("/v1/sessions", json={"problem": "What is 2 + 2?"}).json()["id"]  # closes b (a was read)
        gone = c.get(f"/v1/sessions/{b}")
        # a step whose text alone is past the context (1,024 tokens) is refused before the session changes
        too_long = c.post(f"/v1/sessions/{third}/steps", json={"text": "2 + 2 = 4. " * 400})
        unchanged = c.get(f"/v1/sessions/{third}")
        # one that fits alone (982 tokens) but not inside the verifier's prompt fails in the engine: its session is
        # closed (its chains may be half extended), the others go on
        long = c.post(f"/v1/sessions/{third}/steps", json={"text": "2 + 2 = 4. " * 108})
        after = c.get(f"/v1/sessions/{third}")
        a_more = c.post(f"/v1/sessions/{a}/steps", json={"text": rec["steps"][1]})
        health = c.get("/health")
        sessions = app.state.prmkern.sessions
        evictions = sessions.manager.evictions
        c.delete(f"/v1/sessions/{a}")
        bm = served.engine.block_manager
        wait_until(lambda: bm.num_free_blocks == bm.num_blocks and not served.engine.has_unfinished(),
                   what="every pin to be dropped")
    assert step_b.status_code == 200 and a_state["evicted"] is True and evictions >= 1
    assert len(a_state["step_scores"]) == 1
    assert gone.status_code == 404 and "--max-sessions" in gone.json()["error"]["message"]
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "text", too_long.text
    assert "longer than the context" in too_long.json()["error"]["message"]
    assert unchanged.status_code == 200 and unchanged.json()["steps"] == []
    assert long.status_code == 400 and "is closed" in long.json()["error"]["message"], long.text
    assert after.status_code == 404 and "failed" in after.json()["error"]["message"]
    assert a_more.status_code == 200 and a_more.json()["step"] == 1 and health.status_code == 200
    assert sessions.closed_for_room == 1


def test_a_second_step_of_one_session_is_a_409(records):
    rec = records[0]
    served = fresh()
    slow = SlowSteps(served.engine, 0.02)
    app = build_app(served, ServerConfig(model_name="verifier", verify=CONFIG))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        sid = c.post("/v1/sessions", json={"problem": rec["problem"]}).json()["id"]
        first: dict = {}
        th = threading.Thread(target=lambda: first.update(
            r=httpx.post(f"{url}/v1/sessions/{sid}/steps", json={"text": rec["steps"][0]}, timeout=300)))
        th.start()
        wait_until(lambda: served.engine.stats.generated_tokens > 0, what="the first step to run")
        second = c.post(f"/v1/sessions/{sid}/steps", json={"text": rec["steps"][1]})
        got = c.get(f"/v1/sessions/{sid}")  # waits for the running step
        th.join(300)
    slow.delay = 0.0
    assert second.status_code == 409 and "one after another" in second.json()["error"]["message"]
    assert first["r"].status_code == 200 and got.status_code == 200 and got.json()["steps"] == rec["steps"][:1]
    assert len(got.json()["step_scores"]) == 1


def test_qwen_prm_sessions_over_http_equal_the_python_api(tmp_path):
    from prmkern.tiny import build_prm_checkpoint
    path = build_prm_checkpoint(str(tmp_path / "prm"), seed=5)
    steps = ["13 minus 5 is 8.", "8 plus 10 is 19.", "So the answer is 19."]
    config = VerifyConfig(format="qwen-prm")
    ref = Verifier(fresh(path), config).open("What is 13 - 5 + 10?")
    want = [ref.add_step(s) for s in steps]
    app = build_app(fresh(path), ServerConfig(model_name="prm", verify=config))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        sid = c.post("/v1/sessions", json={"problem": "What is 13 - 5 + 10?"}).json()["id"]
        got = [c.post(f"/v1/sessions/{sid}/steps", json={"text": s}).json() for s in steps]
        assert all("score" in g for g in got), got
        sep = c.post(f"/v1/sessions/{sid}/steps", json={"text": "a <extra_0> b"})
        final = c.get(f"/v1/sessions/{sid}").json()
    assert [g["score"] for g in got] == [w.score for w in want]
    assert [g["p_correct"] for g in got] == [w.p_correct for w in want]
    assert sep.status_code == 400 and "separator" in sep.json()["error"]["message"]
    assert final["steps"] == steps and final["prediction"] == ref.result().prediction  # the refused step left it open


def test_a_server_with_adaptive_chains_opens_fixed_k_sessions(records):
    """The server's --chains-min (adaptive chain count) is a whole-solution setting: sessions run num_chains."""
    config = VerifyConfig(format="prmkern", num_chains=4, chains_min=2, temperature=0.6, max_tokens=64, seed=3)
    app = build_app(fresh(), ServerConfig(model_name="verifier", verify=config))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        opened = c.post("/v1/sessions", json={"problem": records[0]["problem"], "num_chains": 3})
        step = c.post(f"/v1/sessions/{opened.json()['id']}/steps", json={"text": records[0]["steps"][0]})
    assert opened.status_code == 200 and opened.json()["num_chains"] == 3, opened.text
    assert step.status_code == 200 and len(step.json()["p_correct"]) == 3
    session = app.state.prmkern.sessions.manager
    with pytest.raises(ValueError, match="chains_min"):
        session.open("x", verifier=Verifier(fresh(), config))

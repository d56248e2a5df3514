"""/v1/verify as a service (issue 26): the batch form equals the in-process Verifier on the same records; calls queue
under the engine loop's admission, bounded in tokens, and are refused (503 with Retry-After) only when that bound
is full; 64 concurrent verify clients and completions sharing the engine all complete. Loopback, bounded waits."""
from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from prmkern import LLM  # noqa: E402
from prmkern.serve.app import ServerConfig, build_app  # noqa: E402
from prmkern.serve.background import serve_in_thread  # noqa: E402
from prmkern.verify.protocols import Verifier, VerifyConfig  # noqa: E402
from tests.test_server_load import SlowSteps, wait_until  # noqa: E402

CONFIG = VerifyConfig(format="prmkern", num_chains=2, temperature=0.7, max_tokens=8, seed=5)
RECORDS = [{"problem": f"Compute {a} + {b}.", "steps": [f"{a} + {b} = {a + b}.", f"The answer is {a + b}."]}
           for a, b in ((2, 3), (7, 6), (12, 30))]


def test_batch_form_equals_the_in_process_verifier(qwen2_dir):
    ref_llm = LLM(qwen2_dir, device="cpu")
    ref = Verifier(ref_llm, CONFIG).verify([dict(r) for r in RECORDS])
    app = build_app(LLM(qwen2_dir, device="cpu"), ServerConfig(model_name="tiny", verify=CONFIG))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/verify", json={"solutions": [{**rec, "id": i} for i, rec in enumerate(RECORDS)]})
        assert r.status_code == 200, r.text
        got = r.json()
        both = c.post("/v1/verify", json={"problem": "p", "steps": ["a"], "solutions": RECORDS})
        neither = c.post("/v1/verify", json={"num_chains": 1})
        metrics = c.get("/metrics").text
    assert got["object"] == "list" and [d["id"] for d in got["data"]] == [0, 1, 2]
    assert got["usage"]["chains"] == 3 * 2 and got["num_chains"] == 2
    for body, res in zip(got["data"], ref):
        assert body["chains"] == res.to_json(ref_llm.tokenizer)["chains"]
        assert body["step_scores"] == [s.score for s in res.scores.steps]
    assert both.status_code == neither.status_code == 400
    assert "either problem and steps (one solution) or solutions" in both.json()["error"]["message"]
    assert 'prmkern:verifications_total{model_name="tiny"} 3' in metrics
    assert 'prmkern:verification_chains_total{model_name="tiny"} 6' in metrics


def test_refused_only_when_the_token_bound_is_full(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    slow = SlowSteps(llm.engine, 0.01)
    config = VerifyConfig(format="prmkern", num_chains=2, temperature=0.7, max_tokens=200, seed=5)
    # one call alone (~2 * 200 + 512 + its text) fits; a second one does not
    app = build_app(llm, ServerConfig(model_name="tiny", verify=config, max_pending_tokens=1500))
    body = {"problem": "Compute 2 + 3.", "steps": ["2 + 3 = 5."]}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        first: dict = {}
        th = threading.Thread(target=lambda: first.update(r=c.post("/v1/verify", json=body)))
        th.start()
        wait_until(lambda: llm.engine.stats.generated_tokens > 0, what="the first call to run")
        refused = httpx.post(url + "/v1/verify", json=body, timeout=60)
        small = httpx.post(url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=60)
        th.join(120)
        wait_until(lambda: app.state.prmkern.loop.pending_tokens == 0, what="the reservation to be released")
        again = httpx.post(url + "/v1/verify", json={**body, "max_tokens": 4}, timeout=120)
    slow.delay = 0.0
    assert first["r"].status_code == 200 and again.status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max-pending-tokens" in refused.json()["error"]["message"]
    assert small.status_code == 200  # a completion that fits beside the running call is admitted


def test_64_concurrent_verify_clients_all_complete(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    app = build_app(llm, ServerConfig(model_name="tiny", verify=CONFIG))

    async def run(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            verifies = [c.post("/v1/verify", json={**RECORDS[i % 3], "id": i}) for i in range(64)]
            completions = [c.post("/v1/completions", json={"prompt": "the sum is", "max_tokens": 8,
                                                           "temperature": 0}) for _ in range(4)]
            return await asyncio.wait_for(asyncio.gather(*verifies, *completions), 300)

    with serve_in_thread(app) as url:
        answers = asyncio.run(run(url))
    assert [r.status_code for r in answers] == [200] * 68
    bodies = [r.json() for r in answers[:64]]
    assert [b["id"] for b in bodies] == list(range(64)) and all(len(b["chains"]) == 2 for b in bodies)
    assert all(len(r.json()["choices"][0]["text"]) >= 0 for r in answers[64:])
    assert llm.engine.stats.requests >= 64 and not llm.engine.has_unfinished()

"""The server under load and at the edges of its life: 64 concurrent clients batched together and token-identical
to the offline API, a disconnecting client's blocks freed, a full queue answered 503 (not buffered), the API key,
and a graceful shutdown that lets an in-flight request finish. Loopback only; every wait is bounded."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import random_prompts  # noqa: E402
from prmkern import LLM, SamplingParams  # noqa: E402
from prmkern.serve.app import ServerConfig, build_app  # noqa: E402
from prmkern.serve.background import serve_in_thread  # noqa: E402


def wait_until(predicate, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class SlowSteps:
    """Makes each engine step take at least `delay` seconds (a stand-in for a large model), so that a request is
    still running when the test acts on it, whatever the speed of this machine."""

    def __init__(self, engine, delay: float = 0.0):
        self.engine, self.step, self.delay = engine, engine.step, delay
        self.batches: list[set[int]] = []  # per step: the `n` of every running request (when recording)
        self.record = False
        engine.step = self

    def __call__(self):
        time.sleep(self.delay)
        if self.record:
            self.batches.append({s.request.params.n for s in self.engine.scheduler.running})
        return self.step()


def aborted_total(url: str) -> int:
    line = next(x for x in httpx.get(url + "/metrics").text.splitlines()
                if x.startswith("prmkern_aborted_requests_total "))
    return int(line.split()[1])


def idle(engine) -> bool:
    return not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def served(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", num_kvcache_blocks=512)
    slow = SlowSteps(llm.engine)
    with serve_in_thread(build_app(llm, ServerConfig(model_name="tiny"))) as url:
        yield url, llm.engine, slow


def test_64_concurrent_clients_all_answered_batched_and_token_identical(served, qwen2_dir):
    url, engine, _ = served
    prompts = random_prompts([5 + (i * 7) % 40 for i in range(64)], vocab=509, seed=3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = LLM(qwen2_dir, device="cpu").generate(prompts, params)
    steps_before = engine.stats.decode_steps

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> dict:
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                                       "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), 120)

    answers = asyncio.run(main())
    assert len(answers) == 64
    for got, want in zip(answers, ref):
        assert got["choices"][0]["token_ids"] == want.outputs[0].token_ids
        assert got["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    # Continuous batching across connections: 64 x 16 tokens took far fewer decode steps than 64 x 15.
    decode_steps = engine.stats.decode_steps - steps_before
    assert decode_steps < 64 * 15 // 4, decode_steps
    wait_until(lambda: idle(engine), what="the engine to go idle")


def test_disconnect_aborts_and_frees_blocks(served):
    url, engine, slow = served
    slow.delay = 0.005  # 900 tokens take > 4.5 s: the client leaves long before
    wait_until(lambda: idle(engine), what="idle before the test")
    aborted = aborted_total(url)
    generated = engine.stats.generated_tokens
    body = {"prompt": "the solution is", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few tokens arrive, then the client hangs up
            assert any(line.startswith("data: {") for line in got)
            assert engine.scheduler.running
    wait_until(lambda: idle(engine), what="the aborted stream's blocks to be freed")
    assert engine.stats.generated_tokens - generated < 600  # stopped long before its 900 tokens
    # A non-streaming client that times out is aborted too.
    generated = engine.stats.generated_tokens
    with httpx.Client(base_url=url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={**body, "stream": False})
    wait_until(lambda: idle(engine), what="the timed-out request's blocks to be freed")
    assert engine.stats.generated_tokens - generated < 600
    assert aborted_total(url) == aborted + 2
    engine_aborted = next(x for x in httpx.get(url + "/metrics").text.splitlines()
                          if x.startswith("prmkern_engine_aborted_requests_total "))
    assert int(engine_aborted.split()[1]) >= 2
    slow.delay = 0.0


def test_verify_and_completions_share_the_batch_and_verify_disconnect_frees_blocks(served):
    url, engine, slow = served
    wait_until(lambda: idle(engine), what="idle before the test")
    slow.delay, slow.record = 0.002, True
    verify = {"problem": "Compute 2 + 3.", "steps": ["2 + 3 = 5.", "The answer is 5."], "num_chains": 3,
              "max_tokens": 60, "temperature": 0.6}
    with httpx.Client(base_url=url, timeout=60) as c:
        th = threading.Thread(target=lambda: c.post("/v1/completions", json={
            "prompt": "the answer is", "max_tokens": 60, "temperature": 0, "ignore_eos": True}))
        th.start()
        r = c.post("/v1/verify", json=verify)
        th.join(60)
    slow.record = False
    assert r.status_code == 200 and len(r.json()["chains"]) == 3
    # One engine step ran a verify chain (n=3) and the completion (n=1) together.
    assert any({1, 3} <= b for b in slow.batches), slow.batches
    # A verify client that gives up: its chains are aborted at the next step and their blocks freed.
    slow.delay = 0.005  # 3 chains x 800 tokens take > 4 s
    generated = engine.stats.generated_tokens
    with httpx.Client(base_url=url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/verify", json={**verify, "max_tokens": 800})
    wait_until(lambda: idle(engine), what="the abandoned verify call's blocks to be freed")
    assert engine.stats.generated_tokens - generated < 3 * 600
    slow.delay = 0.0


def test_full_queue_answers_503_and_recovers(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    SlowSteps(llm.engine, 0.01)  # 500 tokens take > 5 s: both long requests are running while the others ask
    app = build_app(llm, ServerConfig(model_name="tiny", max_pending=2))
    long = {"prompt": "x", "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
    short = {"prompt": "y", "max_tokens": 2}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as a, \
            httpx.Client(base_url=url, timeout=60) as b:
        with a.stream("POST", "/v1/completions", json=long) as ra, b.stream("POST", "/v1/completions", json=long) as rb:
            # Two requests hold the queue's two places (keep the line iterators: dropping one closes its stream).
            lines = [ra.iter_lines(), rb.iter_lines()]
            assert all(next(it).startswith("data: {") for it in lines)
            refused = [httpx.post(url + "/v1/completions", json=short, timeout=60) for _ in range(3)]
            refused.append(httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        assert [r.status_code for r in refused] == [503] * 4
        assert "limit 2, --max-pending" in refused[0].json()["error"]["message"]
        wait_until(lambda: idle(llm.engine), what="the closed streams to be aborted")
        assert httpx.post(url + "/v1/completions", json=short, timeout=60).status_code == 200
        assert llm.engine.stats.generated_tokens < 500  # the two long streams were aborted when closed
        metrics = httpx.get(url + "/metrics").text
        assert "prmkern_overloaded_requests_total 4" in metrics and "prmkern_pending_requests 0" in metrics


def test_failed_engine_step_answers_500_and_the_loop_goes_on(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    engine, step = llm.engine, llm.engine.step
    calls = {"n": 0}

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step of the first request
            raise RuntimeError("boom")
        return step()

    engine.step = failing_once
    with serve_in_thread(build_app(llm, ServerConfig(model_name="tiny"))) as url:
        body = {"prompt": "the answer is", "max_tokens": 5, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 500 and "engine error: RuntimeError: boom" in r.json()["error"]["message"]
        wait_until(lambda: idle(engine), what="the failed request's blocks to be freed")
        ok = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        # A failure the engine attributes to the requests of one step (the forward pass): those fail, 500.
        run = engine.runner.run
        fail = {"on": True}

        def failing_forward(step):
            if fail.pop("on", False):
                raise RuntimeError("forward boom")
            return run(step)

        engine.runner.run = failing_forward
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": "a new prompt"}, timeout=60)
        assert r.status_code == 500 and "the forward pass failed: RuntimeError: forward boom" in r.text
        wait_until(lambda: idle(engine), what="the failed request's blocks to be freed")
        ok = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


def test_api_key(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    with serve_in_thread(build_app(llm, ServerConfig(model_name="tiny", api_key="s3cret"))) as url:
        body = {"prompt": "x", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        wrong = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "Authorization: Bearer" in wrong.json()["error"]["message"]
        ok = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_graceful_shutdown_finishes_in_flight_requests(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    engine = llm.engine
    SlowSteps(engine, 0.005)  # 120 tokens take > 0.6 s: the shutdown starts while the request runs
    result: dict = {}
    with serve_in_thread(build_app(llm, ServerConfig(model_name="tiny"))) as url:
        def post() -> None:
            r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 120, "temperature": 0,
                                                          "ignore_eos": True}, timeout=60)
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=post)
        t.start()
        wait_until(lambda: engine.stats.generated_tokens > 0, what="the request to start")
    # Leaving the block shut the server down; the request that was running was allowed to finish.
    t.join(60)
    assert result["status"] == 200 and result["body"]["usage"]["completion_tokens"] == 120
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)

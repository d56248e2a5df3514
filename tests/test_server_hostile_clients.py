"""What a red-team audit of the server found on 2026-12-07, each a case that broke before its fix: polling a running
session stalled every other JSON answer, an over-long /v1/verify or session text reserved its whole token count
(503s for others) and tokenized on the event loop, a streamed `echo` never sent the prompt, a burst of complete
requests past --max-connections had some connections reset without an answer, and several 400s named no field or
the wrong one. Loopback only; the shipped verifier, or the tiny random Qwen2 of conftest."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from prmkern import LLM  # noqa: E402
from prmkern.serve.app import ServerConfig, build_app  # noqa: E402
from prmkern.serve.background import serve_in_thread  # noqa: E402
from tests.conftest import serve_llm  # noqa: E402
from tests.test_server_load import SlowSteps, wait_until  # noqa: E402
from tests.test_server_sessions import CONFIG, VERIFIER  # noqa: E402 (the sessions tests' verifier and config)

needs_verifier = pytest.mark.skipif(not os.path.isfile(os.path.join(VERIFIER, "model.safetensors")),
                                    reason="no shipped verifier")


@pytest.fixture(scope="module")
def verifier_server():
    """The shipped verifier behind a server whose engine steps take >= 20 ms (a step of a session runs for seconds
    on any machine), and the SlowSteps hook to lift that."""
    llm = LLM(VERIFIER, device="cpu", dtype="float32")
    slow = SlowSteps(llm.engine, 0.02)
    with serve_in_thread(build_app(llm, ServerConfig(model_name="verifier", verify=CONFIG))) as url:
        yield url, llm, slow


@needs_verifier
def test_polling_a_running_session_does_not_stall_other_answers(verifier_server):
    # Before: each GET waited for the step's lock in a thread of asyncio's default executor (6 threads on 2 CPUs),
    # where every JSON answer is rendered: 8 GETs held a completion until the step ended (29 s).
    url, llm, slow = verifier_server
    with open(os.path.join(VERIFIER, "examples.jsonl")) as f:
        rec = json.loads(f.readline())
    slow.delay = 0.1  # the step's ~40 engine steps take >= 4 s
    with httpx.Client(base_url=url, timeout=300) as c:
        sid = c.post("/v1/sessions", json={"problem": rec["problem"]}).json()["id"]
        step: dict = {}
        stepping = threading.Thread(target=lambda: step.update(
            r=httpx.post(f"{url}/v1/sessions/{sid}/steps", json={"text": rec["steps"][0]}, timeout=300),
            ended=time.perf_counter()))
        tokens0 = llm.engine.stats.generated_tokens
        stepping.start()
        wait_until(lambda: llm.engine.stats.generated_tokens > tokens0, what="the step to run")
        polls = [threading.Thread(target=lambda: httpx.get(f"{url}/v1/sessions/{sid}", timeout=300))
                 for _ in range(10)]
        for p in polls:
            p.start()
        time.sleep(1.0)  # the GETs are waiting for the step
        t = time.perf_counter()
        done = c.post("/v1/completions", json={"prompt": "Compute 2 + 3.", "max_tokens": 2, "temperature": 0})
        answered = time.perf_counter()
        stepping.join(300)
        for p in polls:
            p.join(300)
    slow.delay = 0.02
    assert done.status_code == 200, done.text
    # the step runs for seconds more; before, the completion was answered only as the step ended
    assert step["ended"] - answered > 1.0, f"the completion waited for the session's step ({answered - t:.1f} s)"
    assert step["r"].status_code == 200


@needs_verifier
def test_over_long_texts_are_400s_naming_the_field_before_anything_is_reserved(verifier_server):
    # Before: a 1 MB problem reserved ~1M tokens (a normal call meanwhile got a 503), tokenized on the event loop,
    # and ended as a 400 with param null; a session step did the same and closed its session.
    url, llm, slow = verifier_server
    huge = "Compute 1 + 1. " * 60_000  # 900 KB: under --max-request-bytes (1 MiB), past any context
    ok_body = {"problem": "Compute $13 - 5 + 10$.", "steps": ["Compute 13 - 5 = 8.", "Compute 8 + 10 = 18."],
               "num_chains": 2, "max_tokens": 32}
    slow.delay = 0.0
    try:
        with httpx.Client(base_url=url, timeout=300) as c:
            for body, param in (({"problem": huge, "steps": ["a"]}, "problem"),
                                ({"problem": "p", "steps": ["a", huge]}, "steps")):
                t = time.perf_counter()
                r = c.post("/v1/verify", json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
                assert "longer than the context" in r.json()["error"]["message"]
                assert time.perf_counter() - t < 30
            assert c.post("/v1/verify", json=ok_body).status_code == 200
            assert pending_tokens(url) == 0  # nothing stays reserved
            r = c.post("/v1/sessions", json={"problem": huge})
            assert r.status_code == 400 and r.json()["error"]["param"] == "problem", r.text[:300]
            sid = c.post("/v1/sessions", json={"problem": ok_body["problem"]}).json()["id"]
            r = c.post(f"/v1/sessions/{sid}/steps", json={"text": huge})
            assert r.status_code == 400 and r.json()["error"]["param"] == "text", r.text[:300]
            got = c.get(f"/v1/sessions/{sid}")  # the session is still open and unchanged
            assert got.status_code == 200 and got.json()["steps"] == []
    finally:
        slow.delay = 0.02


def pending_tokens(url: str) -> int:
    """The tokens the server's engine loop holds admitted (prompts + n * max_tokens), from /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith("prmkern_pending_tokens ")]
    assert lines, "no prmkern_pending_tokens in /metrics"
    return int(float(lines[0].split()[-1]))


@pytest.fixture(scope="module")
def tiny_server(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", num_kvcache_blocks=64)
    with serve_llm(llm, model_name="tiny", max_n=8) as url:
        yield url


def _stream_text(url: str, body: dict) -> dict[int, str]:
    texts: dict[int, str] = {}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for ch in json.loads(line[6:]).get("choices", []):
                    texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    return texts


def test_a_streamed_echo_sends_the_prompt(tiny_server):
    # Before: the stream marked the prompt as sent and never sent it.
    body = {"prompt": ["so the total", "one two"], "max_tokens": 6, "temperature": 0.8, "echo": True, "n": 2,
            "seed": 1}
    whole = httpx.post(tiny_server + "/v1/completions", json=body, timeout=60).json()
    assert "choices" in whole, whole
    streamed = _stream_text(tiny_server, body)
    assert {c["index"]: c["text"] for c in whole["choices"]} == streamed
    assert streamed[0].startswith("so the total") and streamed[2].startswith("one two")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/responses", {"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"\u0663": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0, "n": 2}, "n"),
])
def test_400s_name_the_field_the_client_sent(tiny_server, path, body, param):
    r = httpx.post(tiny_server + path, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_an_invalid_json_body_names_no_field(tiny_server):
    r = httpx.post(tiny_server + "/v1/completions", content=b"{not json", timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text


@needs_verifier
@pytest.mark.parametrize("body,param", [
    ({"chains_min": 0}, "chains_min"),
    ({"chains_risk": 2}, "chains_risk"),
    ({"budget_tokens": -1}, "budget_tokens"),
])
def test_verify_settings_400s_name_the_field(verifier_server, body, param):
    r = httpx.post(verifier_server[0] + "/v1/verify", json={"problem": "p", "steps": ["a"], **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_burst_past_the_connection_cap_is_answered_not_reset(qwen2_dir):
    # Before: asyncio made all the burst's connections before reading any, so the cap evicted connections whose
    # whole request was waiting unread: 4 of 12 were reset with no answer. Every one now gets 200 or 503.
    llm = LLM(qwen2_dir, device="cpu", num_kvcache_blocks=32)
    with serve_in_thread(build_app(llm, ServerConfig(model_name="tiny")), max_connections=8) as url:
        host, port = url.removeprefix("http://").split(":")
        payload = b'{"prompt": [1, 2, 3], "max_tokens": 2}'
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                   + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload)
        for _ in range(2):
            socks = []
            for _ in range(12):  # each sends its whole request at once (one that sends nothing may be evicted)
                socks.append(socket.create_connection((host, int(port)), timeout=30))
                socks[-1].sendall(request)
            heads = []
            for s in socks:
                try:
                    heads.append(s.recv(12))
                except ConnectionResetError:
                    heads.append(b"reset")
                s.close()
            assert all(h in (b"HTTP/1.1 200", b"HTTP/1.1 503") for h in heads), heads
            assert httpx.get(url + "/health", timeout=30).status_code == 200

"""`prmkern serve` as a user runs it: a subprocess on loopback with an API key and verification flags, driven by the
`openai` client; SIGTERM lets a running stream finish before the process exits."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_end_to_end_and_sigterm(qwen2_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    cmd = [sys.executable, "-m", "prmkern.cli", "serve", qwen2_dir, "--port", str(port), "--device", "cpu",
           "--api-key", "k3y", "--served-model-name", "tiny", "--format", "prmkern", "--chains", "2",
           "--max-tokens", "24",
           "--max-n", "4", "--shutdown-timeout", "30", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 90 s"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]
        out = client.completions.create(model="tiny", prompt="the answer is", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError, match="accepted: an int in \\[1, 4\\]"):
            client.completions.create(model="tiny", prompt="x", max_tokens=2, n=5)
        # /v1/verify takes its defaults from the verification flags (--chains 2, --max-tokens 24).
        v = httpx.post(url + "/v1/verify", headers={"Authorization": "Bearer k3y"}, timeout=60,
                       json={"problem": "Compute 1 + 1.", "steps": ["1 + 1 = 2.", "The answer is 2."]}).json()
        assert v["format"] == "prmkern" and v["num_chains"] == 2 and len(v["chains"]) == 2
        assert v["usage"]["completion_tokens"] <= 2 * 24
        # SIGTERM during a stream: the stream runs to its end, then the process exits.
        body = {"prompt": "x", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer k3y"}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finals = [json.loads(x[6:])["choices"] for x in rest[:-1]]
        assert finals[-1][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down, so the exit is the signal's (or 0).
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()

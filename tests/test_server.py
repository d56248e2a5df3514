"""The HTTP server, started for real on loopback and driven by the official `openai` client and by httpx: outputs
equal the offline API's on the same checkpoint (greedy tokens, seeded samples, log-probabilities), streams add up
to the non-streamed text, verify equals the in-process Verifier, and every kind of bad input gets a 400 that says
what is accepted while the server goes on answering."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from tests.conftest import openai_client, serve_llm, stop_token_position  # noqa: E402
from prmkern import LLM, SamplingParams  # noqa: E402
from prmkern.serve.app import ServerConfig, build_app  # noqa: E402
from prmkern.serve.background import serve_in_thread  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIER = os.path.join(ROOT, "prmkern", "data", "verifier")
POOL_BLOCKS = 48  # 768 tokens of KV at block size 16: a 900-token prompt fits the context but not the pool


@pytest.fixture(scope="module")
def served(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", num_kvcache_blocks=POOL_BLOCKS)
    with serve_llm(llm, model_name="tiny", max_n=8) as url:
        yield url, llm


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0], timeout=60) as c:
        yield c


def test_models_and_health(http, client):
    assert http.get("/health").json() == {"status": "ok"}
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 1024
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_null_fields_mean_defaults(http):
    body = {"prompt": "x", "max_tokens": 3, "temperature": 0, "n": None, "stream": None, "stop": None,
            "echo": None, "logprobs": None, "seed": None, "user": None}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    r = http.post("/v1/completions", json={"prompt": None, "max_tokens": 3})
    assert r.status_code == 400 and "prompt: Field required" in r.json()["error"]["message"]


def test_completion_greedy_matches_offline(client, offline):
    prompts = ["the solution is", "step 1 we compute 12 + 7 =", "verify each step"]
    got = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    ref = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    assert [c.index for c in got.choices] == [0, 1, 2]
    for choice, r in zip(got.choices, ref):
        assert choice.text == r.outputs[0].text
        assert choice.model_extra["token_ids"] == r.outputs[0].token_ids
        assert choice.finish_reason == r.outputs[0].finish_reason
    assert got.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert got.usage.completion_tokens == sum(len(r.outputs[0].token_ids) for r in ref)


def test_completion_token_prompt_logprobs_and_echo(client, offline):
    ids = offline.tokenizer.encode("we compute the product of each number", add_special_tokens=False)
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, logprobs=0)
    ref = offline.generate([ids], SamplingParams(temperature=0, max_tokens=8, logprobs=0))[0].outputs[0]
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(_sampled(ref.logprobs, ref.token_ids), abs=1e-5)
    assert "".join(lp.tokens) == ref.text and lp.text_offset[0] == 0
    assert all(len(t) == 1 for t in lp.top_logprobs)
    echo = client.completions.create(model="tiny", prompt="the answer is", max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt="the answer is", max_tokens=4, temperature=0)
    assert echo.choices[0].text == "the answer is" + plain.choices[0].text


def _sampled(logprobs, token_ids):
    """The sampled token's logprob per position, from the offline API's {id: Logprob} dicts."""
    return [d[t].logprob for d, t in zip(logprobs, token_ids)]


def test_chat_seeded_samples_match_offline(client, offline):
    messages = [{"role": "system", "content": "check each step"}, {"role": "user", "content": "is 2 + 2 = 4?"}]
    got = client.chat.completions.create(model="tiny", messages=messages, n=3, temperature=0.9, top_p=0.9,
                                         max_tokens=10, seed=123, logprobs=True)
    text = offline.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = offline.tokenizer.encode(text, add_special_tokens=False)
    ref = offline.generate([ids], SamplingParams(n=3, temperature=0.9, top_p=0.9, max_tokens=10, seed=123,
                                                 logprobs=0))[0]
    assert len(got.choices) == 3
    for choice, r in zip(got.choices, ref.outputs):
        assert choice.message.role == "assistant" and choice.message.content == r.text
        assert [c.logprob for c in choice.logprobs.content] == pytest.approx(_sampled(r.logprobs, r.token_ids),
                                                                             abs=1e-5)
    assert got.usage.prompt_tokens == len(ids)


def test_top_logprobs_match_offline(client, offline):
    messages = [{"role": "user", "content": "hello"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3)
    ids = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True),
                                   add_special_tokens=False)
    ref = offline.generate([ids], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    for pos, want, tid in zip(got.choices[0].logprobs.content, ref.logprobs, ref.token_ids):
        best = sorted(want.values(), key=lambda v: v.rank)[:3]
        assert [t.token for t in pos.top_logprobs] == [v.decoded_token for v in best]
        assert [t.logprob for t in pos.top_logprobs] == pytest.approx([v.logprob for v in best], abs=1e-5)
        assert pos.logprob == pytest.approx(want[tid].logprob, abs=1e-5)


def test_echo_with_logprobs_and_prompt_logprobs(http, offline):
    ids = offline.tokenizer.encode("we verify each step of the solution", add_special_tokens=False)
    body = {"prompt": ids, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2, "prompt_logprobs": 1}
    got = http.post("/v1/completions", json=body).json()["choices"][0]
    ref = offline.generate([ids], SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=2))[0]
    lp = got["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [d[t].logprob for d, t in zip(ref.prompt_logprobs[1:], ids[1:])] + _sampled(ref.outputs[0].logprobs,
                                                                                        ref.outputs[0].token_ids)
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert got["text"] == offline.tokenizer.decode(ids) + ref.outputs[0].text
    assert got["prompt_logprobs"][0] is None and len(got["prompt_logprobs"]) == len(ids)
    for pos, d, t in zip(got["prompt_logprobs"][1:], ref.prompt_logprobs[1:], ids[1:]):
        assert pos[str(t)]["logprob"] == pytest.approx(d[t].logprob, abs=1e-5) and pos[str(t)]["rank"] == d[t].rank


def test_penalties_and_min_p_match_offline(http, offline):
    prompt = "the answer is the answer is the"
    knobs = dict(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3, min_p=0.05)
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0.8, "seed": 5, "return_token_ids": True, **knobs}
    got = http.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
    ref = offline.generate([prompt], SamplingParams(max_tokens=12, temperature=0.8, seed=5, **knobs))[0]
    plain = offline.generate([prompt], SamplingParams(max_tokens=12, temperature=0.8, seed=5))[0]
    assert got == ref.outputs[0].token_ids != plain.outputs[0].token_ids


def test_streamed_logprobs_equal_the_whole_answer(http):
    body = {"prompt": "so we add the numbers", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    tokens, lps, tops = [], [], []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                if lp:
                    tokens += lp["tokens"]
                    lps += lp["token_logprobs"]
                    tops += lp["top_logprobs"]
    assert tokens == whole["tokens"] and lps == pytest.approx(whole["token_logprobs"], abs=1e-6)
    assert [sorted(t) for t in tops] == [sorted(t) for t in whole["top_logprobs"]]
    # greedy: the sampled token is the top one, so 2 entries (fewer where two ids decode to the same text)
    assert all(1 <= len(t) <= 2 for t in tops) and sum(len(t) == 2 for t in tops) >= len(tops) // 2


def test_logprob_token_ids_extension(http, offline):
    ids = [5, 17, 42]
    body = {"prompt": "check the step", "max_tokens": 5, "temperature": 0, "logprob_token_ids": ids}
    got = http.post("/v1/completions", json=body).json()["choices"][0]["requested_logprobs"]
    ref = offline.generate(["check the step"], SamplingParams(temperature=0, max_tokens=5, logprob_token_ids=ids))
    want = ref[0].outputs[0].token_logprobs
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert {int(k): v for k, v in g.items()} == pytest.approx(w, abs=1e-5)


def test_streaming_adds_up_to_the_full_text(client, offline):
    prompt = "so the total sum is"
    full = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(full.token_ids)
    # A stop string inside the greedy text: the stream holds back what the stop string cuts.
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stop=[stop]))
    assert "".join(c.choices[0].text for c in chunks) == cut.text and cut.finish_reason == "stop"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_text_leaves_out_the_stop_token_as_offline(client, offline):
    prompt = "so the total sum is"
    tok = offline.get_tokenizer()
    full = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    pos, texts = stop_token_position(tok, full.token_ids)
    stop = full.token_ids[pos]
    for keep in (False, True):
        want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                                         ignore_eos=True, include_stop_str_in_output=keep))[0]
        want = want.outputs[0]
        assert want.text == texts[pos + keep]
        extra = {"stop_token_ids": [stop], "ignore_eos": True, "include_stop_str_in_output": keep}
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, extra_body=extra))
        assert "".join(c.choices[0].text for c in chunks) == want.text
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body=extra)
        assert whole.choices[0].text == want.text and whole.choices[0].finish_reason == "stop"


def test_chat_streaming_n2(client, offline):
    messages = [{"role": "user", "content": "what is 3 * 4?"}]
    kw = dict(model="tiny", messages=messages, n=2, temperature=1.0, max_tokens=12, seed=7)
    whole = client.chat.completions.create(**kw)
    parts = {0: "", 1: ""}
    roles, finish = set(), {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            roles.add(c.delta.role) if c.delta.role else None
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert roles == {"assistant"}
    assert parts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}


def test_raw_sse_format(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "x y", "max_tokens": 3, "temperature": 0,
                                                      "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])


BAD = [  # (path, body, what the message must say)
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "accepted: a float >= 0"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "accepted: a float in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "accepted: an int in [1, 8]"),
    ("/v1/completions", {"prompt": "x", "n": 9}, "accepted: an int in [1, 8]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "accepted: an int >= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, "maximum context length is 1024"),
    ("/v1/completions", {"prompt": [1] * 1024}, "accepted: at most 1023 prompt tokens"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, "outside this model's vocabulary; accepted: ids in [0, 509)"),
    ("/v1/completions", {"prompt": ""}, "accepted: at least one token"),
    ("/v1/completions", {"prompt": []}, "prompt is empty"),
    ("/v1/completions", {"max_tokens": 3}, "prompt: Field required"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids has token ids [100000]"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 5}}, "logit_bias has key 'x'; accepted: token ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"509": 5}}, "accepted: token ids (as strings) in [0, 509)"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"}},
     "guided decoding (JSON mode, JSON schema) is not supported"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a+"}, "guided_regex: guided decoding"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {}}}, "guided decoding"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "accepted: null or best_of == n"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix is not supported"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 0, "stream": True}, "accepted: stream=false"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs=-1 is invalid"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "accepted: an int in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": -1},
     "prompt_logprobs=-1 is invalid; accepted: an int in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty=3.0 is invalid; accepted: a float"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty=0.0 is invalid"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, "min_p=2.0 is invalid"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs needs logprobs=true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tool calling is not supported"),
    ("/v1/verify", {"problem": "p", "steps": []}, "steps"),
    ("/v1/verify", {"problem": "p", "steps": ["a"], "num_chain": 2},  # prmkern's own route stays strict
     "unknown field 'num_chain'; accepted fields: problem, steps"),
    ("/v1/verify", {"problem": "p", "steps": ["a"], "format": "nope"}, "unknown verifier format 'nope'; known:"),
    ("/v1/verify", {"problem": "p", "steps": ["a"], "num_chains": 0}, "accepted: an int in [1, 8]"),
    ("/v1/verify", {"problem": "p", "steps": ["a"], "method": "max"}, "method"),
    ("/v1/verify", {"problem": "p", "steps": ["a"], "scoring": "fast"}, "scoring"),
    ("/v1/verify", {"problem": "p", "steps": ["a"], "temperature": -2}, "accepted: a float >= 0"),
    ("/v1/verify", {"problem": "p", "steps": ["  "]}, "non-empty strings"),
]


@pytest.mark.parametrize("path,body,says", BAD, ids=[f"{p}:{json.dumps(b)[:40]}" for p, b, _ in BAD])
def test_bad_request_is_400_and_server_keeps_serving(http, path, body, says):
    if path != "/v1/verify" and "max_tokens" not in body and "messages" not in body:
        body = {**body, "max_tokens": 2}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert says in err["message"] and err["type"] == "invalid_request_error", err
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_malformed_bodies_and_unknown_model(http):
    for content in (b"{not json", b"[1, 2]", b"\"text\"", b"null", b"[" * 100000 + b"]" * 100000,
                    b'{"prompt": "\xff\xfe"}'):
        r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "not a JSON object" in r.json()["error"]["message"] or "not valid JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature" and "not NaN" in r.text
    r = http.post("/v1/completions", json={"prompt": "word " * 200000, "max_tokens": 2})  # 1 MB of text: refused
    assert r.status_code == 400 and "at most 1023 prompt tokens" in r.json()["error"]["message"]
    r = http.post("/v1/complete", json={})
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and "available: ['tiny'" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]


def test_engine_side_error_fails_alone(http, served):
    """A prompt that fits the context but not the KV pool is refused by the engine itself (in the loop thread):
    that request alone gets a 400 while a good request in the same moment completes."""
    import concurrent.futures as cf
    bad = {"prompt": [7] * 900, "max_tokens": 2}
    good = {"prompt": "the answer is", "max_tokens": 6, "temperature": 0}
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(http.post, "/v1/completions", json=b) for b in (bad, good, bad, good)]
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [400, 200, 400, 200]
    assert f"KV blocks but the pool has {POOL_BLOCKS}" in answers[0].json()["error"]["message"]
    assert len(answers[1].json()["choices"][0]["text"]) > 0


def test_metrics_count_requests_tokens_and_prefix_hits(http, served):
    def scrape() -> dict[str, float]:
        out = {}
        for line in http.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    before = scrape()
    prompt = "the solution is correct because we verify each step " * 4  # several full blocks
    for _ in range(2):
        assert http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0}).is_success
    after = scrape()
    key = 'prmkern_http_requests_total{path="/v1/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 2
    assert after["prmkern_generation_tokens_total"] - before["prmkern_generation_tokens_total"] == 6
    assert after["prmkern_prefix_cache_hit_tokens_total"] - before["prmkern_prefix_cache_hit_tokens_total"] >= 32
    assert after["prmkern_kv_blocks_total"] == POOL_BLOCKS and after["prmkern_pending_requests"] == 0
    assert after['prmkern_request_latency_seconds_count{endpoint="completions"}'] >= 2


@pytest.mark.skipif(not os.path.isfile(os.path.join(VERIFIER, "model.safetensors")), reason="no shipped verifier")
def test_verify_matches_in_process_verifier():
    from prmkern.verify.processbench import load_processbench
    from prmkern.verify.protocols import Verifier, VerifyConfig
    rec = load_processbench(os.path.join(VERIFIER, "examples.jsonl"))[0]
    config = VerifyConfig(format="prmkern", num_chains=3, temperature=0.6, top_p=0.95, max_tokens=320, seed=0)
    ref_llm = LLM(VERIFIER, device="cpu")
    ref = Verifier(ref_llm, config).verify([rec])[0]
    app = build_app(LLM(VERIFIER, device="cpu"), ServerConfig(model_name="verifier", verify=config))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/verify", json={"problem": rec["problem"], "steps": rec["steps"], "id": "a"})
        assert r.status_code == 200, r.text
        got = r.json()
        # per-request overrides: fewer chains, no chain text
        short = c.post("/v1/verify", json={"problem": rec["problem"], "steps": rec["steps"], "num_chains": 1,
                                           "include_chains": False}).json()
    assert got["id"] == "a" and got["num_chains"] == 3 and len(got["chains"]) == 3
    assert got["scoring"] == short["scoring"] == "exact"  # the prmkern format's default, recorded per response
    assert ref.scores.score is not None  # the shipped verifier writes verdicts: real scores to compare
    assert got["step_scores"] == pytest.approx([s.score for s in ref.scores.steps], abs=1e-6)
    assert got["solution_score"] == pytest.approx(ref.scores.score, abs=1e-6)
    assert got["earliest_error"] == ref.scores.earliest_error == rec["label"]
    assert got["chains"] == ref.to_json(ref_llm.tokenizer)["chains"]
    assert "chains" not in short and short["num_chains"] == 1 and len(short["step_scores"]) == len(rec["steps"])
    assert short["id"] is None


"""vLLM's and OpenAI's server surface where prmkern has the feature (issue 26): fields vLLM ignores are accepted
and change nothing, logit_bias gives the offline API's tokens, guided decoding is a 400 naming it, /ping,
/version, /tokenize and /detokenize answer vLLM's shapes (tokens against the tokenizer itself), and /metrics carries
vLLM's metric names under the prmkern: prefix with a model_name label, consistent with what was served."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from tests.conftest import openai_client, serve_llm  # noqa: E402
from prmkern import LLM, SamplingParams, __version__  # noqa: E402


@pytest.fixture(scope="module")
def served(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", num_kvcache_blocks=64)
    with serve_llm(llm, model_name="tiny", max_n=4) as url:
        yield url, llm


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


def test_openai_client_script_with_ignored_fields_and_logit_bias(client, offline):
    # ---- an OpenAI-client script ----
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "add 2 and 3"}],
                                           max_tokens=6, temperature=0)
    tagged = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "add 2 and 3"}],
                                            max_tokens=6, temperature=0, metadata={"run": "a"}, store=False,
                                            user="u1", service_tier="auto", parallel_tool_calls=False,
                                            response_format={"type": "text"})
    first = offline.generate(["the answer is"], SamplingParams(temperature=0, max_tokens=1))[0].outputs[0]
    banned = first.token_ids[0]
    biased = client.completions.create(model="tiny", prompt="the answer is", max_tokens=4, temperature=0,
                                       logit_bias={str(banned): -100, "7": 3.5}, extra_body={"return_token_ids": True})
    # ---- checks ----
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    ref = offline.generate(["the answer is"], SamplingParams(temperature=0, max_tokens=4,
                                                             logit_bias={banned: -100.0, 7: 3.5}))[0].outputs[0]
    assert biased.choices[0].model_extra["token_ids"] == ref.token_ids and ref.token_ids[0] != banned
    with pytest.raises(openai.BadRequestError, match="guided decoding"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       response_format={"type": "json_object"})


def test_unknown_fields_ignored_with_one_warning_per_name(client, caplog):
    # ---- an OpenAI-client script sending fields written for another server ----
    plain = client.completions.create(model="tiny", prompt="the answer is", max_tokens=4, temperature=0)
    with caplog.at_level("WARNING", logger="prmkern.serve"):
        extra = [client.completions.create(model="tiny", prompt="the answer is", max_tokens=4, temperature=0,
                                           extra_body={"zz_vendor_knob": i, "zz_other": "x"}) for i in range(3)]
        chat = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": "hi", "zz_msg_field": 1}])
    # ---- checks: same answer, each unknown name warned about once (per process), the known-but-unsupported 400 ----
    assert all(e.choices[0].text == plain.choices[0].text for e in extra)
    assert chat.choices[0].message.content is not None
    warned = [r.getMessage() for r in caplog.records if "ignored request fields" in r.getMessage()]
    assert sum("zz_vendor_knob" in m for m in warned) == 1 and sum("zz_other" in m for m in warned) == 1
    assert sum("zz_msg_field" in m for m in warned) == 1
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, suffix="y")


def test_ping_version_tokenize_detokenize(served, offline):
    url = served[0]
    tok = offline.get_tokenizer()
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/ping").status_code == 200 and c.post("/ping").status_code == 200
        assert c.get("/version").json() == {"version": __version__}
        got = c.post("/tokenize", json={"prompt": "two plus two", "return_token_strs": True}).json()
        ids = tok.encode("two plus two")
        assert got == {"count": len(ids), "max_model_len": 1024, "tokens": ids,
                       "token_strs": tok.convert_ids_to_tokens(ids)}
        messages = [{"role": "user", "content": "hi"}]
        chat = c.post("/tokenize", json={"messages": messages}).json()
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
        assert c.post("/detokenize", json={"tokens": ids}).json() == {"prompt": tok.decode(ids)}
        bad = c.post("/detokenize", json={"tokens": [10 ** 6]})
        assert bad.status_code == 400 and "outside this model's vocabulary" in bad.json()["error"]["message"]
        both = c.post("/tokenize", json={"prompt": "x", "messages": messages})
        assert both.status_code == 400 and "exactly one of prompt" in both.json()["error"]["message"]


def _scrape(c) -> dict[str, float]:
    out = {}
    for line in c.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_vllm_metrics_under_the_prmkern_prefix(served):
    url, llm = served
    label = '{model_name="tiny"}'
    with httpx.Client(base_url=url, timeout=60) as c:
        before = _scrape(c)
        for _ in range(2):
            r = c.post("/v1/completions", json={"prompt": [5, 6, 7, 8] * 10, "max_tokens": 5, "temperature": 0,
                                                "ignore_eos": True})
            assert r.status_code == 200
        after = _scrape(c)
    gen = "prmkern:generation_tokens_total" + label
    assert after[gen] - before.get(gen, 0) == 10
    assert after["prmkern:generation_tokens_total" + label] == llm.stats.generated_tokens
    assert after["prmkern:prefix_cache_hits_total" + label] == llm.stats.cached_tokens
    assert after["prmkern:prefix_cache_hits_total" + label] - before.get("prmkern:prefix_cache_hits_total" + label,
                                                                         0) >= 32  # the second call hit the cache
    assert after["prmkern:num_requests_running" + label] == 0 == after["prmkern:num_requests_waiting" + label]
    assert after["prmkern:kv_cache_usage_perc" + label] == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        count = f"prmkern:{name}_count" + label
        assert after[count] - before.get(count, 0) == 2
        assert after[f'prmkern:{name}_bucket{{model_name="tiny",le="+Inf"}}'] == after[count]
    itl = "prmkern:inter_token_latency_seconds_count" + label
    assert after[itl] - before.get(itl, 0) == 2 * 4  # 5 tokens: 4 gaps per request

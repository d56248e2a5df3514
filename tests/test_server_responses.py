"""/v1/responses through the openai client, as a user calls it: text answers equal the offline LLM.chat() on the same
conversation (instructions as the system message), streaming events add up to the same text in vLLM's order, usage
counts the tokens, sampling fields reach the engine (a seeded sample equals chat's), and what this server cannot do
(tools, background, previous_response_id, guided decoding, non-text items) is a 400 naming it."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.conftest import openai_client, serve_llm  # noqa: E402
from prmkern import LLM, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def served(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", num_kvcache_blocks=64)
    with serve_llm(llm, model_name="tiny") as url:
        yield url


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served)


def _greedy_chat(offline, messages, max_tokens):
    return offline.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))[0]


def test_text_response_equals_offline_chat(client, offline):
    # ---- an OpenAI-client script ----
    r = client.responses.create(model="tiny", input="add 2 and 3", instructions="answer briefly",
                                max_output_tokens=7, temperature=0)
    items = client.responses.create(model="tiny", temperature=0, max_output_tokens=5, input=[
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "5"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and "},
                                                        {"type": "input_text", "text": "4 more?"}]}])
    # ---- checks ----
    ref = _greedy_chat(offline, [{"role": "system", "content": "answer briefly"},
                                 {"role": "user", "content": "add 2 and 3"}], 7)
    out = ref.outputs[0]
    assert r.object == "response" and r.model == "tiny" and r.id.startswith("resp_")
    assert r.output_text == out.text and r.output[0].role == "assistant" and r.output[0].type == "message"
    assert r.status == ("incomplete" if out.finish_reason == "length" else "completed")
    assert (r.incomplete_details is not None) == (out.finish_reason == "length")
    assert r.usage.input_tokens == len(ref.prompt_token_ids) and r.usage.output_tokens == len(out.token_ids)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "answer briefly" and r.max_output_tokens == 7
    ref2 = _greedy_chat(offline, [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"},
                                  {"role": "user", "content": "and 4 more?"}], 5)
    assert items.output_text == ref2.outputs[0].text and items.usage.input_tokens == len(ref2.prompt_token_ids)


def test_streamed_events_add_up_in_vllms_order(client):
    whole = client.responses.create(model="tiny", input="count to five", max_output_tokens=12, temperature=0)
    # ---- streaming, as a user iterates it ----
    events = list(client.responses.create(model="tiny", input="count to five", max_output_tokens=12, temperature=0,
                                          stream=True))
    # ---- checks ----
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) <= {"response.output_text.delta"} and len(kinds) > 8
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == whole.output_text == final.output_text == events[-4].text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.status == whole.status
    assert events[0].response.status == "in_progress"


def test_sampling_fields_and_logprobs_reach_the_engine(client):
    messages = [{"role": "user", "content": "pick a number"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.9, top_p=0.8,
                                          seed=11, logprobs=True, top_logprobs=2)
    r = client.responses.create(model="tiny", input=messages, max_output_tokens=8, temperature=0.9, top_p=0.8,
                                top_logprobs=2, include=["message.output_text.logprobs"], extra_body={"seed": 11})
    assert r.output_text == chat.choices[0].message.content
    assert r.temperature == pytest.approx(0.9) and r.top_p == pytest.approx(0.8)
    got = r.output[0].content[0].logprobs
    want = chat.choices[0].logprobs.content
    assert [g.token for g in got] == [w.token for w in want] and len(got) == r.usage.output_tokens
    assert all(g.logprob == pytest.approx(w.logprob, abs=1e-6) and len(g.top_logprobs) == 2 for g, w in zip(got, want))
    plain = client.responses.create(model="tiny", input=messages, max_output_tokens=3, temperature=0, top_logprobs=2)
    assert plain.output_text and all(c.logprobs == [] for c in plain.output[0].content)  # vLLM's: only with
    assert plain.top_logprobs is None  # include=["message.output_text.logprobs"]


@pytest.mark.parametrize("fields,says", [
    (dict(tools=[{"type": "function", "name": "f", "parameters": {}}]), "tool calling is not supported"),
    (dict(background=True), "background responses are not supported"),
    (dict(previous_response_id="resp_123"), "stores no responses"),
    (dict(text={"format": {"type": "json_object"}}), "guided decoding"),
    (dict(input=[{"type": "function_call_output", "call_id": "c", "output": "1"}]), "'function_call_output' item"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input_image"),
    (dict(max_output_tokens=5000), "maximum context length"),
    (dict(input=[]), "input is an empty list"),
])
def test_unsupported_features_are_a_400_naming_them(client, fields, says):
    body = {"model": "tiny", "input": "x", "max_output_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError, match=says):
        client.responses.create(**body)
    ok = client.responses.create(model="tiny", input="x", max_output_tokens=2, temperature=0, store=True,
                                 metadata={"k": "v"}, extra_body={"zz_unknown": 1})  # ignored, as vLLM does
    assert ok.usage.output_tokens >= 1

"""/v1/responses: OpenAI's Responses API for text, as vLLM 0.32 serves it without tools, over the same engine loop.

`input` is a string (one user message) or a list of message items ({role, content}, content a string or a list of
input_text / output_text parts); `instructions` becomes a leading system message; the conversation is rendered by
the chat template as /v1/chat/completions renders it. `max_output_tokens`, `temperature`, `top_p` and vLLM's
sampling extensions (top_k, min_p, penalties, seed, stop, stop_token_ids, ignore_eos, logit_bias) mean what they
mean in chat. The answer is a `response` object with one assistant message item (`output_text`), status
"completed", or "incomplete" with incomplete_details {reason: max_output_tokens}, and usage
{input_tokens, output_tokens, total_tokens, input_tokens_details.cached_tokens}. With `stream: true` it is vLLM's
event sequence (`event: <type>` + `data: <json>` per event, sequence numbers from 0): response.created,
response.in_progress, response.output_item.added, response.content_part.added, response.output_text.delta...,
response.output_text.done, response.content_part.done, response.output_item.done, response.completed.

Refused with a 400 naming the feature (this server has none of them): tools and tool choices that call one,
background mode, previous_response_id (no response is stored: vLLM without its store answers 404), reusable
`prompt` templates, non-text input items (images, files, tool outputs), and `text.format` other than text (guided
decoding). `store`, `metadata`, `user`, `reasoning`, `truncation`, ... are accepted and ignored, as vLLM ignores them
without its store.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationError

from prmkern.outputs import RequestOutput
from prmkern.serve.calls import ChainText
from prmkern.serve.engine_loop import ChainDelta, ChainDone, RequestDone
from prmkern.serve.logprobs import chat_logprobs, lp_entries
from prmkern.serve.openai_api import (CLIENT_CLOSED, _chat_prompt, _check_model, _collect, _failure, _logprobs_arg,
                                      _max_tokens, _params, _start)
from prmkern.serve.protocol import BadRequest, ChatCompletionRequest, Number, _Body, _Request
from prmkern.serve.responses import json_response


class InputPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class InputItem(_Body):
    """A message item of `input` (type "message" or omitted); any other item type is refused by name."""
    type: StrictStr = "message"
    role: StrictStr | None = None
    content: StrictStr | list[InputPart] | None = None


class ResponsesRequest(_Request):
    model: StrictStr | None = None
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = None  # None: the rest of the model's context
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    logit_bias: dict[str, Number] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    top_logprobs: StrictInt | None = None
    include: list[StrictStr] | None = None  # only "message.output_text.logprobs" changes the answer
    stream: StrictBool = False
    text: dict[str, Any] | None = None  # {"format": {"type": "text"}} only
    # refused unless at their no-op value (see the module docstring)
    tools: list[Any] | None = None
    tool_choice: Any = None
    background: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    prompt: Any = None
    # accepted and ignored, as vLLM ignores them without its response store
    store: StrictBool | None = None
    metadata: dict[str, Any] | None = None
    user: StrictStr | None = None
    service_tier: StrictStr | None = None
    truncation: Literal["auto", "disabled"] | None = None
    parallel_tool_calls: StrictBool | None = None
    max_tool_calls: StrictInt | None = None
    reasoning: dict[str, Any] | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    request_id: StrictStr | None = Field(default=None, max_length=256)  # vLLM's: the response's id


def _check_supported(req: ResponsesRequest) -> None:
    if req.tools or req.tool_choice not in (None, "none", "auto"):
        raise BadRequest("tools: tool calling is not supported by this server; accepted: tools null or [], "
                         "tool_choice null, 'auto' or 'none'", "tools")
    if req.background:
        raise BadRequest("background: background responses are not supported (this server stores no responses); "
                         "accepted: false", "background")
    if req.previous_response_id is not None:
        raise BadRequest("previous_response_id: this server stores no responses to continue from; accepted: null "
                         "(send the whole conversation as input)", "previous_response_id")
    if req.prompt is not None:
        raise BadRequest("prompt: reusable prompt templates are not supported; accepted: null (send input)", "prompt")
    fmt = (req.text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") != "text":
        raise BadRequest(f"text.format {fmt!r}: guided decoding (JSON mode, JSON schema) is not supported by this "
                         f"server; accepted: null or {{'type': 'text'}}", "text")


def _messages(req: ResponsesRequest) -> list[dict[str, str]]:
    """The chat messages: instructions as a system message, then the input (a string is one user message)."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        if item.type != "message" or item.role not in ("user", "system", "developer", "assistant") \
                or item.content is None:
            raise BadRequest(f"input[{i}] is a {item.type!r} item with role {item.role!r}; accepted: message items "
                             f"with role user, system, developer or assistant and text content (this server has no "
                             f"tools, images or files)", "input")
        if isinstance(item.content, str):
            text = item.content
        else:
            bad = [p.type for p in item.content if p.type not in ("input_text", "output_text") or p.text is None]
            if bad:
                raise BadRequest(f"input[{i}].content has parts of type {bad}; accepted: input_text and output_text "
                                 f"parts with text", "input")
            text = "".join(p.text or "" for p in item.content)
        messages.append({"role": item.role, "content": text})
    return messages


def _as_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The equivalent chat request: its prompt rendering and SamplingParams are /v1/chat/completions' own."""
    wants_logprobs = "message.output_text.logprobs" in (req.include or [])  # vLLM's: top_logprobs alone gives none
    fields = {name: getattr(req, name) for name in (
        "model", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logit_bias", "skip_special_tokens",
        "include_stop_str_in_output")}
    messages = _messages(req)
    if not messages:
        raise BadRequest("input is an empty list; accepted: a string or at least one message item", "input")
    try:
        return ChatCompletionRequest(messages=messages, max_tokens=req.max_output_tokens, logprobs=wants_logprobs,
                                     top_logprobs=(req.top_logprobs or 0) if wants_logprobs else None,
                                     **{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:  # a message the chat schema refuses (e.g. a role): the request's fault
        raise BadRequest(f"input: {e.errors()[0].get('msg')}", "input") from e


def _usage(prompt: list[int], out: RequestOutput) -> dict[str, Any]:
    generated = sum(len(o.token_ids) for o in out.outputs)
    return {"input_tokens": len(prompt), "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
            "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(prompt) + generated}


def _text_part(text: str, logprobs: Any) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


async def create_response(state: Any, req: ResponsesRequest, http: Request) -> Response:
    start = time.perf_counter()
    _check_model(state, req.model)
    _check_supported(req)
    chat = _as_chat(req)
    prompt = _chat_prompt(state, chat)
    lp_arg = _logprobs_arg(state, chat.top_logprobs or 0, "top_logprobs") if chat.logprobs else None
    params = _params(state, chat, _max_tokens(state, req.max_output_tokens, len(prompt), "max_output_tokens"), lp_arg)
    k = chat.top_logprobs or 0
    rid, msg_id = req.request_id or f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": state.model_name,
            "instructions": req.instructions, "metadata": req.metadata, "parallel_tool_calls": True,
            "temperature": params.temperature, "top_p": params.top_p, "tool_choice": "none", "tools": [],
            "background": False, "max_output_tokens": params.max_tokens, "previous_response_id": None,
            "service_tier": req.service_tier or "auto", "text": {"format": {"type": "text"}},
            "top_logprobs": params.logprobs, "truncation": req.truncation or "disabled", "user": req.user,
            "incomplete_details": None, "error": None, "usage": None}
    call = await _start(state, http, [prompt], params, req.stream)

    def logprobs_of(token_ids: list[int], entries: Any) -> list[dict[str, Any]]:
        return chat_logprobs(lp_entries(state, token_ids, entries, k), k)["content"] if chat.logprobs else []

    def finished(out: RequestOutput) -> dict[str, Any]:
        o = out.outputs[0]
        item = {"id": msg_id, "type": "message", "role": "assistant", "status": "completed",
                "content": [_text_part(o.text, logprobs_of(o.token_ids, o.logprobs))] if o.text else []}
        incomplete = o.finish_reason == "length"
        return {**base, "status": "incomplete" if incomplete else "completed", "output": [item],
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "usage": _usage(prompt, out)}

    if not req.stream:
        try:
            outs = await _collect(call, 1)
        finally:
            call.close()
        if outs is None:
            return Response(status_code=CLIENT_CLOSED)
        state.metrics.observe_latency("responses", time.perf_counter() - start)
        return await json_response(lambda: finished(outs[0]))
    return StreamingResponse(_stream(state, call, start, base, msg_id, ChainText(state.tokenizer, params),
                                     logprobs_of, finished), media_type="text/event-stream")


async def _stream(state: Any, call: Any, start: float, base: dict, msg_id: str, chain: ChainText, logprobs_of: Any,
                  finished: Any) -> AsyncIterator[str]:
    """vLLM's event sequence for one text message (see the module docstring)."""
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        body = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    pending = {**base, "status": "in_progress", "output": []}
    try:
        yield event("response.created", response=pending)
        yield event("response.in_progress", response=pending)
        yield event("response.output_item.added", output_index=0, item={
            "id": msg_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []})
        yield event("response.content_part.added", **where, part=_text_part("", []))
        first = True
        while True:
            item = await call.next_event()
            if item is None:
                return  # the client left: close() aborts the request
            _, ev = item
            if isinstance(ev, ChainDelta):
                if first:
                    state.metrics.observe_ttft("responses", time.perf_counter() - start)
                    first = False
                text = chain.push(ev.token_ids, ev.text, ev.hide_last)
                if text:
                    yield event("response.output_text.delta", **where, delta=text,
                                logprobs=logprobs_of(ev.token_ids, ev.logprobs))
            elif isinstance(ev, ChainDone):
                rest = chain.finish(ev.output.text)
                if rest:
                    yield event("response.output_text.delta", **where, delta=rest, logprobs=[])
            elif isinstance(ev, RequestDone):
                call.mark_finished(0)
                done = finished(ev.output)
                part = done["output"][0]["content"][0] if done["output"][0]["content"] else _text_part("", [])
                yield event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
                yield event("response.content_part.done", **where, part=part)
                yield event("response.output_item.done", output_index=0, item=done["output"][0])
                yield event("response.completed", response=done)
                state.metrics.observe_latency("responses", time.perf_counter() - start)
                return
            else:  # RequestFailed
                call.mark_finished(0)
                err = _failure(ev).body()["error"]
                yield event("error", code=str(err["code"]), message=err["message"], param=err["param"])
                return
    finally:
        call.close()

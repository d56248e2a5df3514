"""/v1/completions and /v1/chat/completions: OpenAI's request and response shapes over the engine loop.

A call's prompts become engine requests (one per prompt, `n` chains each, sharing the prompt's KV blocks); the
answer is either one JSON body or server-sent events in OpenAI's chunk format ending with `data: [DONE]`. The
handler validates everything it can before submitting, so a stream starts only for a runnable request; an error
the engine finds later fails that call alone (a 400 body, or an error event in a stream). A client that
disconnects has its requests aborted and their KV blocks freed.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from prmkern.outputs import RequestOutput
from prmkern.prompts import encode_bounded
from prmkern.sampling_params import SamplingParams
from prmkern.serve.calls import ChainText, EngineCall
from prmkern.serve.engine_loop import ChainDelta, ChainDone, Overloaded, RequestDone, RequestFailed
from prmkern.serve.logprobs import chat_logprobs, choice_extras, completion_logprobs, logprob_dicts, lp_entries
from prmkern.serve.responses import json_response
from prmkern.serve.protocol import (ApiError, BadRequest, ChatCompletionRequest, CompletionRequest, overloaded,
                                    sampling_params)

CLIENT_CLOSED = 499  # nginx's code for "client closed request": logged in /metrics, never seen by the client


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# -- validation ------------------------------------------------------------------------------------------------------
def _check_model(state: Any, name: str | None) -> None:
    if name is not None and name not in state.model_names:
        raise ApiError(404, f"model {name!r} is not served here; available: {[state.model_name]}", "model",
                       "not_found_error")


def _check_ids(state: Any, ids: list[int], what: str) -> None:
    vocab = state.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise BadRequest(f"{what} has token ids {bad[:5]} outside this model's vocabulary; accepted: ids in "
                         f"[0, {vocab})", what)


def _encode(state: Any, text: str) -> list[int]:
    """Token ids of a text prompt; a text too long for the context is refused after tokenizing a bounded prefix."""
    if state.tokenizer is None:
        raise BadRequest("text prompts need a tokenizer and this model has none; accepted: token id lists",
                         "prompt")
    try:
        return encode_bounded(state.tokenizer, text, state.max_model_len - 1, state.max_token_chars)
    except ValueError as e:
        raise BadRequest(f"{e}; accepted: at most {state.max_model_len - 1} prompt tokens", "prompt") from e


def _completion_prompts(state: Any, prompt: Any) -> tuple[list[list[int]], list[str]]:
    """Prompt(s) as token ids, and their text (for echo). One prompt: a string or a list of ids; several: a list."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise BadRequest("prompt is empty; accepted: a string, a list of strings, a list of token ids or a list "
                         "of token id lists", "prompt")
    if len(prompt) > state.max_prompts:
        raise BadRequest(f"{len(prompt)} prompts in one request; accepted: at most {state.max_prompts}", "prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(_encode(state, p))
            texts.append(p)
        else:
            _check_ids(state, p, "prompt")
            ids.append(list(p))
            texts.append(state.tokenizer.decode(p) if state.tokenizer is not None else "")
        if not ids[-1]:
            raise BadRequest("a prompt is empty; accepted: at least one token", "prompt")
    return ids, texts


def _max_tokens(state: Any, requested: int | None, prompt_len: int, name: str = "max_tokens") -> int:
    """The completion's token limit: `requested` (the body's field `name`) or the room left in the context."""
    room = state.max_model_len - prompt_len
    if room < 1:
        raise BadRequest(f"the prompt has {prompt_len} tokens and this model's context is {state.max_model_len}; "
                         f"accepted: at most {state.max_model_len - 1} prompt tokens", "prompt")
    if requested is None:
        return room
    if requested < 1:
        raise BadRequest(f"{name}={requested} is invalid; accepted: an int >= 1", name)
    if requested > room:
        raise BadRequest(f"this model's maximum context length is {state.max_model_len} tokens, but "
                         f"{prompt_len + requested} were requested ({prompt_len} in the prompt, {requested} in the "
                         f"completion); accepted: {name} <= {room} for this prompt", name)
    return requested


def _logprobs_arg(state: Any, k: int | None, name: str) -> int | None:
    """logprobs / top_logprobs / prompt_logprobs: capped like vLLM's max_logprobs (the response, and the work of
    building it, grows with k at every position; uncapped, prompt_logprobs reached the vocabulary)."""
    if k is not None and not 0 <= k <= state.max_logprobs:
        raise BadRequest(f"{name}={k} is invalid; accepted: an int in [0, {state.max_logprobs}] (0: the sampled "
                         f"token's log-probability only; the server's --max-logprobs raises the limit)", name)
    return k


def _params(state: Any, req: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
    _logprobs_arg(state, req.prompt_logprobs, "prompt_logprobs")
    for name in ("stop_token_ids", "logprob_token_ids", "logit_bias"):
        ids = getattr(req, name) or []
        if len(ids) > state.max_token_ids:  # each id costs work at every position of every chain, in the engine
            raise BadRequest(f"{name} has {len(ids)} entries; accepted: at most {state.max_token_ids} (the server's "
                             f"--max-token-ids)", name)
        if name != "logit_bias":
            _check_ids(state, ids, name)
    return sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, max_n=state.max_n, vocab=state.vocab_size,
                           defaults=state.sampling_defaults)


# -- running a call --------------------------------------------------------------------------------------------------
async def _start(state: Any, http: Request, prompts: list[list[int]], params: SamplingParams,
                 stream: bool) -> EngineCall:
    call = EngineCall(state.loop, on_abort=state.count_abort)
    try:
        call.submit(prompts, params, want_deltas=stream)
    except Overloaded as e:
        state.metrics.overloaded += 1
        raise overloaded(str(e)) from e
    call.watch_disconnect(http.receive)
    return call


async def _collect(call: EngineCall, count: int) -> list[RequestOutput] | None:
    """Every prompt's final output, in order; None if the client disconnected. An engine-side failure of any
    prompt aborts the rest and raises its ApiError."""
    outs: list[RequestOutput | None] = [None] * count
    while any(o is None for o in outs):
        item = await call.next_event()
        if item is None:
            return None
        i, event = item
        if isinstance(event, RequestDone):
            call.mark_finished(i)
            outs[i] = event.output
        elif isinstance(event, RequestFailed):
            call.mark_finished(i)
            where = f"prompt {i}: " if count > 1 else ""
            raise _failure(event, where)
    return outs  # type: ignore[return-value]


def _failure(event: RequestFailed, where: str = "") -> ApiError:
    kind = "invalid_request_error" if event.status == 400 else "server_error"
    return ApiError(event.status, where + event.message, None, kind)


def _usage(prompts: list[list[int]], outs: list[RequestOutput]) -> dict[str, int]:
    p = sum(len(ids) for ids in prompts)
    c = sum(len(o.token_ids) for r in outs for o in r.outputs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _respond(state: Any, call: EngineCall, endpoint: str, start: float, prompts: list[list[int]],
                   build: Any) -> Response:
    try:
        outs = await _collect(call, len(prompts))
    finally:
        call.close()
    if outs is None:
        return Response(status_code=CLIENT_CLOSED)
    state.metrics.observe_latency(endpoint, time.perf_counter() - start)
    return await json_response(build, outs)


async def _events(state: Any, call: EngineCall, endpoint: str, start: float, prompts: list[list[int]],
                  include_usage: bool, on_delta: Any, on_done: Any, head: list[str]) -> AsyncIterator[str]:
    """The SSE stream of a call: `head` chunks, then per-chain deltas and finishes, usage, [DONE]."""
    first = True
    outs: list[RequestOutput] = []
    try:
        for chunk in head:
            yield chunk
        remaining = len(prompts)
        while remaining:
            item = await call.next_event()
            if item is None:
                return
            i, event = item
            if isinstance(event, ChainDelta):
                if first:
                    state.metrics.observe_ttft(endpoint, time.perf_counter() - start)
                    first = False
                chunk = on_delta(i, event)
            elif isinstance(event, ChainDone):
                chunk = on_done(i, event)
            elif isinstance(event, RequestDone):
                call.mark_finished(i)
                outs.append(event.output)
                remaining -= 1
                continue
            else:
                call.mark_finished(i)
                yield _sse(_failure(event).body())
                break
            if chunk is not None:
                yield _sse(chunk)
        if include_usage and not remaining:
            yield _sse({**on_done(None, None), "choices": [], "usage": _usage(prompts, outs)})
        yield "data: [DONE]\n\n"
        state.metrics.observe_latency(endpoint, time.perf_counter() - start)
    finally:
        call.close()


# -- /v1/completions -------------------------------------------------------------------------------------------------
async def create_completion(state: Any, req: CompletionRequest, http: Request) -> Response:
    start = time.perf_counter()
    _check_model(state, req.model)
    if req.suffix:
        raise BadRequest("suffix is not supported; accepted: null", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise BadRequest(f"best_of={req.best_of} is not supported; accepted: null or best_of == n", "best_of")
    prompts, texts = _completion_prompts(state, req.prompt)
    lp_arg = _logprobs_arg(state, req.logprobs, "logprobs")
    echo_lps = req.echo and req.logprobs is not None  # the prompt's tokens get log-probabilities too
    if req.stream and (echo_lps or req.prompt_logprobs is not None):
        raise BadRequest("prompt log-probabilities (echo with logprobs, prompt_logprobs) are returned without "
                         "streaming; accepted: stream=false", "stream")
    params = _params(state, req, _max_tokens(state, req.max_tokens, max(map(len, prompts))), lp_arg)
    k = req.logprobs or 0
    if echo_lps:
        params.prompt_logprobs = max(k, req.prompt_logprobs or 0)
    rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
    base = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    call = await _start(state, http, prompts, params, req.stream)

    def choice(index: int, text: str, logprobs: Any, finish: str | None, stop: Any = None, **extra: Any) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop,
                **extra}

    if not req.stream:
        def build(outs: list[RequestOutput]) -> dict[str, Any]:
            choices = []
            for i, r in enumerate(outs):
                prefix = texts[i] if req.echo else ""
                echoed = lp_entries(state, prompts[i], r.prompt_logprobs, k) if echo_lps else []
                for o in r.outputs:
                    lps = None
                    if req.logprobs is not None:
                        lps = completion_logprobs(echoed + lp_entries(state, o.token_ids, o.logprobs, k),
                                                   0 if echo_lps else len(prefix))
                    extra = choice_extras(req, o.token_ids, o.token_logprobs)
                    if req.prompt_logprobs is not None:
                        extra["prompt_logprobs"] = logprob_dicts(r.prompt_logprobs)
                    choices.append(choice(i * n + o.index, prefix + o.text, lps, o.finish_reason, o.stop_reason,
                                          **extra))
            return {**base, "choices": choices, "usage": _usage(prompts, outs)}
        return await _respond(state, call, "completions", start, prompts, build)

    chains: dict[tuple[int, int], ChainText] = {}
    offsets: dict[tuple[int, int], int] = {}

    def chain(i: int, c: int) -> ChainText:
        if (i, c) not in chains:
            chains[i, c] = ChainText(state.tokenizer, params, texts[i] if req.echo else "")
            offsets[i, c] = len(texts[i]) if req.echo else 0
        return chains[i, c]

    def on_delta(i: int, ev: ChainDelta) -> dict | None:
        text = chain(i, ev.index).push(ev.token_ids, ev.text, ev.hide_last)
        lps = None
        if req.logprobs is not None:
            entries = lp_entries(state, ev.token_ids, ev.logprobs, k)
            lps = completion_logprobs(entries, offsets[i, ev.index])
            offsets[i, ev.index] += sum(len(e[0]) for e in entries)
        extra = choice_extras(req, ev.token_ids, ev.token_logprobs)
        if not text and lps is None and not extra:
            return None
        return {**base, "choices": [choice(i * n + ev.index, text, lps, None, **extra)]}

    def on_done(i: int | None, ev: ChainDone | None) -> dict:
        if ev is None:
            return dict(base)
        o = ev.output
        return {**base, "choices": [choice(i * n + o.index, chain(i, o.index).finish(o.text), None,
                                           o.finish_reason, o.stop_reason)]}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_events(state, call, "completions", start, prompts, include_usage, on_delta, on_done,
                                     []), media_type="text/event-stream")


# -- /v1/chat/completions --------------------------------------------------------------------------------------------
def _chat_prompt(state: Any, req: ChatCompletionRequest) -> list[int]:
    tok = state.tokenizer
    if tok is None or not (state.chat_template or getattr(tok, "chat_template", None)):
        raise BadRequest("this model has no chat template; accepted: /v1/completions with a prompt", "messages")
    if len(req.messages) > state.max_messages:
        raise BadRequest(f"{len(req.messages)} messages; accepted: at most {state.max_messages}", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                                       chat_template=state.chat_template)
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages (e.g. role order): the client's
        raise BadRequest(f"the chat template rejected these messages: {e}", "messages") from e
    return _encode(state, text)


async def create_chat_completion(state: Any, req: ChatCompletionRequest, http: Request) -> Response:
    start = time.perf_counter()
    _check_model(state, req.model)
    if req.tools or (req.tool_choice not in (None, "none")):
        raise BadRequest("tool calling is not supported; accepted: tools null or [], tool_choice null or 'none'",
                         "tools")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise BadRequest("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
    if req.stream and req.prompt_logprobs is not None:
        raise BadRequest("prompt_logprobs are returned without streaming; accepted: stream=false", "stream")
    prompt = _chat_prompt(state, req)
    lp_arg = _logprobs_arg(state, req.top_logprobs or 0, "top_logprobs") if req.logprobs else None
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = _params(state, req, _max_tokens(state, requested, len(prompt), name), lp_arg)
    k = req.top_logprobs or 0
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name}
    call = await _start(state, http, [prompt], params, req.stream)

    if not req.stream:
        def build(outs: list[RequestOutput]) -> dict[str, Any]:
            choices = []
            for o in outs[0].outputs:
                lps = chat_logprobs(lp_entries(state, o.token_ids, o.logprobs, k), k) if req.logprobs else None
                c = {"index": o.index, "message": {"role": "assistant", "content": o.text}, "logprobs": lps,
                     "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                choices.append({**c, **choice_extras(req, o.token_ids, o.token_logprobs)})
            extra = {"prompt_logprobs": logprob_dicts(outs[0].prompt_logprobs)} \
                if req.prompt_logprobs is not None else {}
            return {**base, "choices": choices, "usage": _usage([prompt], outs), **extra}
        return await _respond(state, call, "chat", start, [prompt], build)

    chunk_base = {**base, "object": "chat.completion.chunk"}
    chains: dict[int, ChainText] = {}

    def on_delta(_: int, ev: ChainDelta) -> dict | None:
        text = chains.setdefault(ev.index, ChainText(state.tokenizer, params)).push(ev.token_ids, ev.text,
                                                                                  ev.hide_last)
        c: dict[str, Any] = {"index": ev.index, "delta": {"content": text} if text else {}, "finish_reason": None}
        if req.logprobs:
            c["logprobs"] = chat_logprobs(lp_entries(state, ev.token_ids, ev.logprobs, k), k)
        c.update(choice_extras(req, ev.token_ids, ev.token_logprobs))
        if not text and len(c) == 3:
            return None
        return {**chunk_base, "choices": [c]}

    def on_done(_: int | None, ev: ChainDone | None) -> dict:
        if ev is None:
            return dict(chunk_base)
        o = ev.output
        text = chains.setdefault(o.index, ChainText(state.tokenizer, params)).finish(o.text)
        return {**chunk_base, "choices": [{"index": o.index, "delta": {"content": text} if text else {},
                                           "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}]}

    head = [_sse({**chunk_base, "choices": [{"index": c, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]}) for c in range(params.n)]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_events(state, call, "chat", start, [prompt], include_usage, on_delta, on_done, head),
                             media_type="text/event-stream")

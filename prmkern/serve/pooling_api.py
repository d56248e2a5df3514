"""/pooling: vLLM's pooling endpoint for a reward model (Qwen2ForProcessRewardModel) on the server's engine loop.

Request (vLLM's PoolingCompletionRequest / PoolingChatRequest): `input` (a string, a list of strings, a list of
token ids or a list of such lists) or `messages` (one chat conversation, rendered by the tokenizer's chat template
without a generation prompt, as the PRM's model card renders a solution), `model`, `encoding_format` ("float"),
`add_special_tokens`, `user`, and prmkern's pooling fields `step_tag_id`, `returned_token_ids`, `use_activation`.
Response (vLLM's PoolingResponse): {"id": "pool-...", "object": "list", "created", "model", "data": [{"index",
"object": "pooling", "data": [[P(label 0), P(label 1)] per step separator]}], "usage": {"prompt_tokens",
"total_tokens", "completion_tokens": 0, "prompt_tokens_details": null}}.

Pooling requests join the running batch like completions (continuous batching, one prefix cache); a client that
disconnects has its requests aborted. Knows nothing of verification formats (/v1/verify runs those).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StrictBool, StrictInt, StrictStr

from prmkern.pooling import PoolingParams
from prmkern.serve.engine_loop import Overloaded, RequestDone
from prmkern.serve.protocol import ApiError, BadRequest, ChatMessage, _Body


class PoolingRequest(_Body):
    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    encoding_format: Literal["float"] = "float"
    add_special_tokens: StrictBool = False
    user: StrictStr | None = None
    step_tag_id: StrictInt | None = None
    returned_token_ids: list[StrictInt] | None = None
    use_activation: StrictBool = True


def _prompts(state: Any, req: PoolingRequest) -> list[str | list[int]]:
    if (req.input is None) == (req.messages is None):
        raise BadRequest("give exactly one of 'input' (text or token ids) and 'messages' (a chat conversation)",
                         "input")
    if req.messages is not None:
        if state.tokenizer is None or not getattr(state.tokenizer, "chat_template", None):
            raise BadRequest("'messages' needs a tokenizer with a chat template; send 'input'", "messages")
        convo = [{"role": m.role, "content": m.text()} for m in req.messages]
        text = state.tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False)
        return [state.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)]
    inp = req.input
    if isinstance(inp, str):
        items: list[Any] = [inp]
    elif inp and all(isinstance(t, int) for t in inp):
        items = [list(inp)]
    else:
        items = list(inp)
    if not items:
        raise BadRequest("'input' is empty; accepted: a string, token ids, or a non-empty list of either", "input")
    if len(items) > state.max_prompts:
        raise BadRequest(f"{len(items)} inputs; accepted: at most {state.max_prompts} (--max-prompts)", "input")
    if req.add_special_tokens and state.tokenizer is not None:
        items = [state.tokenizer.encode(x, add_special_tokens=True) if isinstance(x, str) else x for x in items]
    return items


async def create_pooling(state: Any, req: PoolingRequest, http: Request) -> Response:
    start = time.perf_counter()
    if req.model is not None and req.model not in state.model_names:
        raise ApiError(404, f"model {req.model!r} is not served here; available: {[state.model_name]}",
                       "model", "not_found_error")
    if not state.engine.is_pooling_model:
        raise BadRequest(f"/pooling needs a pooling model (Qwen2ForProcessRewardModel); this server's model "
                         f"({state.engine.model.spec.architecture}) generates: use /v1/completions")
    prompts = _prompts(state, req)
    try:
        params = PoolingParams(step_tag_id=req.step_tag_id, returned_token_ids=req.returned_token_ids,
                               use_activation=req.use_activation)
    except ValueError as e:
        raise BadRequest(str(e)) from e
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in prompts]

    def sink_for(i: int):
        def sink(event: Any) -> None:
            loop.call_soon_threadsafe(lambda: futures[i].done() or futures[i].set_result(event))
        return sink

    streams = []
    try:
        for i, prompt in enumerate(prompts):
            streams.append(state.loop.submit(prompt, None, sink_for(i), pooling=params))
    except Overloaded as e:
        for s in streams:
            state.loop.abort(s)
        state.metrics.overloaded += 1
        raise ApiError(503, str(e), None, "overloaded_error") from e
    gone = asyncio.ensure_future(_disconnected(http))
    work = asyncio.gather(*futures)
    done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if work not in done:
        for s in streams:
            state.loop.abort(s)
        state.count_abort()
        work.cancel()
        return Response(status_code=499)
    gone.cancel()
    data, prompt_tokens = [], 0
    for i, event in enumerate(work.result()):
        if not isinstance(event, RequestDone):
            if event.status == 400:
                raise BadRequest(f"input {i}: {event.message}", "input")
            raise ApiError(event.status, event.message, None, "server_error")
        out = event.output
        prompt_tokens += len(out.prompt_token_ids)
        data.append({"index": i, "object": "pooling", "data": out.outputs.data.tolist()})
    state.metrics.observe_latency("pooling", time.perf_counter() - start)
    return JSONResponse({"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                         "model": state.model_name, "data": data,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                   "completion_tokens": 0, "prompt_tokens_details": None}})


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass

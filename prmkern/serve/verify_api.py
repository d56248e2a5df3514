"""/v1/verify: prmkern's own endpoint. A problem and its steps in; per-step scores, the solution score, the earliest
error and the verification chains out, computed by the verifier protocols of prmkern.verify.protocols.

The protocol code is synchronous (it calls `llm.generate` once per round: K chains, budget forcing, code rounds),
so each verify call runs it in a worker thread against `LoopLLM`, a stand-in for prmkern.LLM whose `generate`
submits to the server's one engine loop and blocks until its requests finish. Verify chains and completion
requests therefore share one engine, one prefix cache and one continuously batched step. A client that
disconnects cancels its call: the worker's pending engine requests are aborted and their blocks freed.
With `"stream": true` the answer is server-sent events: each streamed verdict event (verify/streaming.py: "step"
per step verdict, "decided" once a solution's earliest error is settled, with the solution's index in the call),
then one "result" event holding the body the call answers without streaming, then `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import re
import threading
import time
from typing import Any, Sequence

import torch
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from prmkern.outputs import CompletionOutput, RequestOutput
from prmkern.pooling import PoolingOutput, PoolingParams, PoolingRequestOutput
from prmkern.prompts import encode_bounded
from prmkern.sampling_params import SamplingParams
from prmkern.serve.engine_loop import ChainDelta, ChainDone, EngineLoop, Overloaded, RequestDone
from prmkern.serve.protocol import ApiError, BadRequest, VerifyRequest, overloaded
from prmkern.serve.responses import json_response
from prmkern.verify.formats import get_format
from prmkern.verify.protocols import Verifier, VerifyConfig

# VerifyConfig fields that a format's published defaults set (formats.format_defaults and verify_config._GENERIC).
FORMAT_DERIVED = ("num_chains", "temperature", "top_p", "top_k", "max_tokens", "method", "max_code_rounds",
                  "scoring", "chains_max")
TEMPLATE_TOKENS = 512  # the verifier format's instructions around a solution, at most (for the admission estimate)
VERIFY_OVERRIDES = ("format", "num_chains", "temperature", "top_p", "max_tokens", "budget_tokens", "method",
                    "threshold", "seed", "scoring", "stop_at_first_error", "chains_min", "chains_max", "chains_risk")


class Cancelled(Exception):
    """The verify call's client went away; the worker stops at its next engine round."""


class LoopLLM:
    """What Verifier needs of an LLM (`tokenizer`, `generate`), backed by the shared engine loop. One per call."""

    def __init__(self, loop: EngineLoop, tokenizer: Any, cancel: threading.Event):
        self.loop = loop
        self.engine = loop.engine  # read only here (metrics, is_pooling_model, step_tag_id): the loop thread steps it
        self.tokenizer = tokenizer
        self.cancel = cancel

    def generate(self, prompts: Sequence[str | list[int]], sampling_params: SamplingParams | Sequence[SamplingParams],
                 use_tqdm: bool = False, watch: Any = None) -> list[RequestOutput]:
        """As LLM.generate; a watch (stop at the first error) reads each request's chains from the loop's deltas
        and aborts a request it decides on, which then answers with its chains as they stood."""
        prompts = list(prompts)
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return self._run(prompts, params, None, watch)

    def reward(self, prompts: Sequence[str | list[int]],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
               use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """LLM.reward over the loop: the discriminative format's one pooled pass per solution (a session step
        gives one PoolingParams per prompt: where its pooling starts)."""
        prompts = list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            pooling = [pooling_params or PoolingParams()] * len(prompts)
        else:
            pooling = list(pooling_params)
            if len(pooling) != len(prompts):
                raise ValueError(f"got {len(pooling)} PoolingParams for {len(prompts)} prompts")
        return self._run(prompts, [None] * len(prompts), pooling, None)

    def _run(self, prompts: list, params: list, pooling: list | None, watch: Any) -> list:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        streams = []
        views: list[dict[int, _ChainView]] = [{} for _ in prompts]
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                streams.append(self.loop.submit(prompt, sp, lambda ev, i=i: inbox.put((i, ev)),
                                                want_deltas=watch is not None, reserved=True,
                                                pooling=pooling[i] if pooling is not None else None))
            outs: list[Any] = [None] * len(prompts)
            left = len(prompts)
            while left:
                if self.cancel.is_set():
                    raise Cancelled()
                try:
                    i, event = inbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                if outs[i] is not None:  # aborted by the watch: later events of its stream do not count
                    continue
                if isinstance(event, (ChainDelta, ChainDone)):
                    _ChainView.absorb(views[i], event)
                    if watch(i, sorted(views[i].values(), key=lambda v: v.chain_index)):
                        self.loop.abort(streams[i])
                        outs[i] = _aborted_output(i, views[i], params[i].n, self.tokenizer)
                        left -= 1
                    continue
                if isinstance(event, RequestDone):
                    outs[i] = event.output
                elif event.status == 400 and pooling is not None:
                    outs[i] = PoolingRequestOutput(str(i), PoolingOutput(torch.empty(0, 2)), [], True, event.message)
                elif event.status == 400:  # this prompt alone is invalid: the protocol records its error
                    outs[i] = RequestOutput(str(i), None, [], [], True, event.message)
                else:
                    raise ApiError(event.status, event.message, None, "server_error")
                left -= 1
            return outs  # type: ignore[return-value]
        finally:
            for stream in streams:
                if not stream.closed:
                    self.loop.abort(stream)


class _ChainView:
    """One chain of a streamed request, as early_exit's watch reads it (the engine Sequence's fields)."""

    def __init__(self, chain_index: int):
        self.chain_index = chain_index
        self.ids: list[int] = []
        self.token_logprobs: list[dict[int, float]] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.output: Any = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.ids)

    def output_tokens_from(self, start: int) -> list[int]:
        return self.ids[start:]

    @staticmethod
    def absorb(views: dict[int, "_ChainView"], event: Any) -> None:
        index = event.index if isinstance(event, ChainDelta) else event.output.index
        view = views.setdefault(index, _ChainView(index))
        if isinstance(event, ChainDelta):
            view.ids.extend(event.token_ids)
            view.token_logprobs.extend(event.token_logprobs or [{} for _ in event.token_ids])
        else:
            view.finished, view.finish_reason, view.output = True, event.output.finish_reason, event.output


def _aborted_output(i: int, views: dict[int, _ChainView], n: int, tokenizer: Any) -> RequestOutput:
    """The RequestOutput of a request the watch aborted: finished chains as they ended, the others "abort"."""
    outs = []
    for k in range(n):
        v = views.get(k) or _ChainView(k)
        if v.output is not None:
            outs.append(v.output)
        else:
            outs.append(CompletionOutput(index=k, text=tokenizer.decode(v.ids), token_ids=list(v.ids),
                                         cumulative_logprob=None, logprobs=None, finish_reason="abort",
                                         token_logprobs=list(v.token_logprobs)))
    return RequestOutput(str(i), None, [], outs, True, None)


def verify_config(defaults: VerifyConfig, req: VerifyRequest, max_n: int, max_tokens: int,
                  server_options: dict[str, Any] | None = None) -> VerifyConfig:
    """The server's verification config with this request's overrides, validated (BadRequest says what is accepted).

    A request that names a format other than the server's gets that format's published defaults (K, method,
    sampling: formats.format_defaults), then the options the operator set explicitly (`server_options`), then its
    own fields; the format-independent settings (code limits, runner) stay the server's."""
    overrides = {k: getattr(req, k) for k in VERIFY_OVERRIDES if getattr(req, k) is not None}
    if "format" in overrides and overrides["format"] != defaults.format.name:
        kept = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)
                if f.name not in FORMAT_DERIVED and f.name != "format"}
        try:
            defaults = VerifyConfig(**{**kept, **(server_options or {}), "format": overrides["format"]})
        except (TypeError, ValueError, KeyError) as e:
            raise BadRequest(str(e).strip("'\""), "format") from e
    if "num_chains" in overrides and not 1 <= overrides["num_chains"] <= max_n:
        raise BadRequest(f"num_chains={overrides['num_chains']} is invalid; accepted: an int in [1, {max_n}]",
                         "num_chains")
    if "chains_max" in overrides:  # the adaptive count's K is num_chains: the same limit
        if not 1 <= overrides["chains_max"] <= max_n:
            raise BadRequest(f"chains_max={overrides['chains_max']} is invalid; accepted: an int in [1, {max_n}]",
                             "chains_max")
        overrides.setdefault("num_chains", overrides["chains_max"])
    elif "num_chains" in overrides and (overrides.get("chains_min") or defaults.chains_min) is not None:
        overrides["chains_max"] = overrides["num_chains"]  # an adaptive count up to the request's K
    elif "chains_min" in overrides:
        overrides["chains_max"] = None  # up to the server's K (num_chains)
    if "max_tokens" in overrides and not 1 <= overrides["max_tokens"] <= max_tokens:
        raise BadRequest(f"max_tokens={overrides['max_tokens']} is invalid; accepted: an int in [1, {max_tokens}]",
                         "max_tokens")
    try:
        fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
        config = VerifyConfig(**{**fields, **overrides})
        # Sampling values are checked where the engine checks them, before any chain runs.
        SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=max(1, config.max_tokens))
    except (TypeError, ValueError, KeyError) as e:
        message = str(e).strip("'\"")
        raise BadRequest(message, named_field(message, list(overrides) + ["temperature", "top_p"])) from e
    return config


def named_field(message: str, fields: Sequence[str]) -> str | None:
    """Of `fields`, the one an error message names first (the 400's `param`), or None."""
    found = [(m.start(), f) for f in fields if (m := re.search(rf"\b{re.escape(f)}\b", message))]
    return min(found)[1] if found else None


def _check_code_execution(state: Any, req: VerifyRequest) -> None:
    """A format that runs the model's code (GenPRM's) is the server operator's choice (--allow-code-execution),
    never a client's: refused before anything else is looked at."""
    if state.allow_code_execution:
        return
    try:
        fmt = get_format(req.format if req.format is not None else state.verify_defaults.format)
    except (KeyError, ValueError, TypeError):
        return  # an unknown format: verify_config says what is accepted
    if fmt.code_regex is not None:
        raise BadRequest(f"format {fmt.name!r} runs the model's Python code, and this server does not allow code "
                         f"execution; accepted: a format without code (the server's operator may start it with "
                         f"--allow-code-execution)", "format")


def _records(state: Any, req: VerifyRequest) -> list[dict[str, Any]]:
    if req.solutions is None:
        sols = [{"problem": req.problem, "steps": req.steps, "id": req.id}]
    else:
        if len(req.solutions) > state.max_solutions:
            raise BadRequest(f"{len(req.solutions)} solutions; accepted: at most {state.max_solutions}", "solutions")
        sols = [{"problem": s.problem, "steps": s.steps, "id": s.id} for s in req.solutions]
    for sol in sols:
        if len(sol["steps"]) > state.max_steps:
            raise BadRequest(f"{len(sol['steps'])} steps; accepted: at most {state.max_steps}", "steps")
    return [{k: v for k, v in sol.items() if v is not None} for sol in sols]


def prompt_tokens(state: Any, text: str) -> int | None:
    """Tokens of `text`, or None when it has more than the context holds (max_model_len - 1); the tokenizing is
    bounded (prompts.encode_bounded: a megabyte of text costs a prefix's worth). Without a tokenizer: len / 4."""
    if state.tokenizer is None:
        return len(text) // 4
    try:
        return len(encode_bounded(state.tokenizer, text, state.max_model_len - 1, state.max_token_chars))
    except ValueError:
        return None


def estimated_cost(state: Any, records: list[dict[str, Any]], config: VerifyConfig) -> int:
    """The tokens a verify call may put in the engine: each solution's text (tokenized) plus the template's
    words, and K chains of max_tokens each. Reserved once, before the first round (EngineLoop.reserve).

    A solution longer than the context is a 400 naming it before anything is reserved when it is the call's only
    one; in a batch it fails alone (its row says why) and counts as one context's worth."""
    total = 0
    for i, rec in enumerate(records):
        prompt = prompt_tokens(state, rec["problem"] + "\n".join(rec["steps"]))
        if prompt is None:
            if len(records) == 1:
                fits = prompt_tokens(state, rec["problem"]) is not None
                raise BadRequest(f"{'the steps make the solution' if fits else 'problem is'} longer than the "
                                 f"context: more than {state.max_model_len - 1} tokens (max_model_len "
                                 f"{state.max_model_len}); accepted: a solution that fits",
                                 "steps" if fits else "problem")
            prompt = state.max_model_len
        total += prompt + TEMPLATE_TOKENS + config.num_chains * config.max_tokens
    return total


async def verify(state: Any, req: VerifyRequest, http: Request) -> Response:
    start = time.perf_counter()
    if req.model is not None and req.model not in state.model_names:
        raise ApiError(404, f"model {req.model!r} is not served here; available: {[state.model_name]}",
                       "model", "not_found_error")
    records = _records(state, req)
    _check_code_execution(state, req)
    config = verify_config(state.verify_defaults, req, state.max_n, state.max_model_len - 1,
                           state.verify_options)
    cost = await asyncio.to_thread(estimated_cost, state, records, config)  # tokenizing: off the event loop
    try:
        state.loop.reserve(cost)  # queued below the bound (the engine's scheduler), refused above it
    except Overloaded as e:
        state.metrics.overloaded += 1
        raise overloaded(str(e)) from e
    cancel = threading.Event()
    if req.stream:
        return _stream(state, req, records, config, cost, cancel, start)
    try:
        try:
            verifier = Verifier(LoopLLM(state.loop, state.tokenizer, cancel), config)
        except ValueError as e:
            raise BadRequest(str(e), named_field(str(e), VERIFY_OVERRIDES)) from e
        work = asyncio.get_running_loop().run_in_executor(state.verify_executor, verifier.verify, records)
        gone = asyncio.ensure_future(_disconnected(http))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            cancel.set()  # the worker aborts its requests at once and stops
            state.count_abort()
            try:
                await work
            except Exception:  # noqa: BLE001 - Cancelled, or whatever the worker met: nobody is listening
                pass
            return Response(status_code=499)
        gone.cancel()
        try:
            results = work.result()
        except Overloaded as e:
            state.metrics.overloaded += 1
            raise overloaded(str(e)) from e
    finally:
        state.loop.unreserve(cost)

    if req.solutions is None and results[0].error is not None:
        raise BadRequest(results[0].error, named_field(results[0].error, ("steps", "problem")))
    state.metrics.observe_latency("verify", time.perf_counter() - start)
    return await json_response(lambda: _body(state, req, records, config, results))


def _body(state: Any, req: VerifyRequest, records: list[dict[str, Any]], config: VerifyConfig,
          results: list) -> dict[str, Any]:
    """The call's answer (in a worker thread: decoding every chain's text is not the event loop's work)."""
    bodies = []
    for rec, result in zip(records, results):
        body = result.to_json(state.tokenizer, include_chains=req.include_chains)
        body["id"] = rec.get("id")  # the client's id, or null (not the record's index within this call)
        bodies.append(body)
    usage = {"chains": sum(len(r.chains) for r in results),
             "completion_tokens": sum(len(t.token_ids) for r in results for c in r.chains for t in c.turns)}
    settings = dict(model=state.model_name, format=config.format.name, num_chains=config.num_chains, usage=usage)
    if req.solutions is None:
        return {**bodies[0], **settings}
    return {"object": "list", "data": bodies, **settings}


def _stream(state: Any, req: VerifyRequest, records: list[dict[str, Any]], config: VerifyConfig, cost: int,
            cancel: threading.Event, start: float) -> StreamingResponse:
    """`"stream": true`: the worker's verdict events as server-sent events, then the body as a "result" event.
    The reservation is released when the stream ends; a client that goes away cancels the worker."""
    aio = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    try:
        verifier = Verifier(LoopLLM(state.loop, state.tokenizer, cancel), config)
    except ValueError as e:
        state.loop.unreserve(cost)
        raise BadRequest(str(e), named_field(str(e), VERIFY_OVERRIDES)) from e
    verifier.on_event = lambda ev: aio.call_soon_threadsafe(inbox.put_nowait, ev)
    work = aio.run_in_executor(state.verify_executor, verifier.verify, records)

    async def events() -> Any:
        try:
            while True:
                getter = asyncio.ensure_future(inbox.get())
                done, _ = await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield f"data: {json.dumps(getter.result())}\n\n"
                    continue
                getter.cancel()
                while not inbox.empty():
                    yield f"data: {json.dumps(inbox.get_nowait())}\n\n"
                break
            try:
                results = work.result()
                body = await aio.run_in_executor(state.verify_executor, _body, state, req, records, config, results)
                yield f"data: {json.dumps({'type': 'result', **body})}\n\n"
            except Exception as e:  # noqa: BLE001 - the stream has begun: the failure is its last event
                yield f"data: {json.dumps({'type': 'error', 'message': f'{type(e).__name__}: {e}'})}\n\n"
            yield "data: [DONE]\n\n"
            state.metrics.observe_latency("verify", time.perf_counter() - start)
        finally:
            if not work.done():  # the client went away mid-stream
                cancel.set()
                state.count_abort()
                # the worker ends with Cancelled, which nobody awaits: retrieved here, not logged as an error
                work.add_done_callback(lambda f: f.cancelled() or f.exception())
            state.loop.unreserve(cost)
    return StreamingResponse(events(), media_type="text/event-stream")


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass

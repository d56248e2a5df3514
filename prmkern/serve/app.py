"""The FastAPI application: routes, errors in OpenAI's shape, the API key and body-size guard, and the lifespan
that starts the engine loop and, on shutdown, answers whatever is still unfinished.

`build_app(llm, ServerConfig(...))` serves a prmkern.LLM's engine; `prmkern serve` (prmkern/cli/serve.py) builds both.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prmkern.prompts import max_token_chars
from prmkern.serve.engine_loop import EngineLoop
from prmkern.serve.metrics import ServerMetrics
from prmkern.serve.openai_api import create_chat_completion, create_completion
from prmkern.serve.pooling_api import PoolingRequest, create_pooling
from prmkern.serve.responses_api import ResponsesRequest, create_response
from prmkern.serve.sessions_api import (SessionOpenRequest, SessionStepRequest, SessionStore, add_step,
                                        delete_session, fork_session, get_session, open_session)
from prmkern.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, VerifyRequest,
                                    accepted_fields)
from prmkern.serve.tokenize_api import DetokenizeRequest, TokenizeRequest, detokenize, tokenize, version
from prmkern.serve.responses import json_response
from prmkern.serve.verify_api import verify
from prmkern.verify.protocols import VerifyConfig
from prmkern.verify.sessions import SessionLimits

BODY_MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
               "/v1/responses": ResponsesRequest, "/v1/verify": VerifyRequest, "/tokenize": TokenizeRequest,
               "/detokenize": DetokenizeRequest, "/pooling": PoolingRequest, "/v1/sessions": SessionOpenRequest,
               "/v1/sessions/{id}/steps": SessionStepRequest}


@dataclass
class ServerConfig:
    model_name: str  # what /v1/models lists and requests may name
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_pending: int = 512  # requests in the engine loop (queued + running) before new ones get 503
    # tokens admitted (prompts + n * max_tokens of unanswered requests, verify calls' estimates) before new calls get
    # 503 with Retry-After; below it every call queues in the engine's scheduler
    max_pending_tokens: int = 1 << 20
    max_request_bytes: int = 1 << 20
    max_n: int = 64  # chains per prompt (n, num_chains)
    max_prompts: int = 64  # prompts in one /v1/completions call
    max_messages: int = 256
    max_steps: int = 256  # steps in one /v1/verify call
    max_verify: int = 64  # verify calls running at once (worker threads); more wait for a worker, none is refused
    max_solutions: int = 64  # solutions in one batch /v1/verify call
    max_logprobs: int = 20  # vLLM's max_logprobs: the most logprobs / top_logprobs / prompt_logprobs per position
    max_token_ids: int = 256  # the longest stop_token_ids / logprob_token_ids list (and logit_bias dict)
    allow_code_execution: bool = False  # /v1/verify may run model-written code (format genprm) in the sandbox
    request_timeout_s: float = 10.0  # a request's body must arrive within this (its headers: connections.py)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    # The verifier options the operator set explicitly (VerifyConfig field -> value, format excluded): a request that
    # names another format gets that format's defaults with these on top, then its own fields.
    verify_options: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # --chat-template: a Jinja template replacing the tokenizer's
    max_sessions: int = 1024  # open /v1/sessions; past it the least recently used idle one is closed
    # sessions holding pinned KV and the blocks they pin (None: SessionLimits' defaults, half the KV pool)
    session_limits: SessionLimits | None = None

    def __post_init__(self) -> None:
        for name in ("max_pending", "max_request_bytes", "max_n", "max_prompts", "max_messages", "max_steps",
                     "max_verify", "max_logprobs", "max_token_ids", "max_pending_tokens", "max_solutions",
                     "max_sessions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name}={value!r} is invalid; accepted: an int >= 1")


class ServerState:
    """What the handlers share: the engine loop, the tokenizer, limits and metrics."""

    def __init__(self, llm: Any, config: ServerConfig):
        engine = llm.engine
        self.engine = engine
        self.tokenizer = llm.tokenizer
        self.config = config
        self.model_name = config.model_name
        self.model_names = {config.model_name, llm.config.model}
        self.vocab_size = engine.model.spec.vocab_size
        self.max_model_len = engine.max_model_len
        self.max_n, self.max_prompts = config.max_n, config.max_prompts
        self.max_messages, self.max_steps, self.max_verify = config.max_messages, config.max_steps, config.max_verify
        self.max_solutions = config.max_solutions
        self.verify_defaults = config.verify
        self.verify_options = dict(config.verify_options)
        self.max_logprobs, self.max_token_ids = config.max_logprobs, config.max_token_ids
        self.allow_code_execution = config.allow_code_execution
        self.chat_template = config.chat_template
        # the checkpoint's generation_config.json sampling defaults (vLLM applies them where a request is silent)
        self.sampling_defaults = dict(getattr(llm, "_sampling_defaults", {}))
        engine.metrics.model_name = config.model_name
        self.loop = EngineLoop(engine, config.max_pending, config.max_pending_tokens)
        self.metrics = ServerMetrics()
        self.verify_executor = ThreadPoolExecutor(config.max_verify, thread_name_prefix="prmkern-verify")
        self.sessions = SessionStore(self, config.max_sessions, config.session_limits)
        self.started = time.time()
        self._token_texts: dict[int, str] = {}
        self.max_token_chars = max_token_chars(self.tokenizer) if self.tokenizer is not None else 1

    def count_abort(self) -> None:
        self.metrics.aborted += 1

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs show it (cached: the vocabulary bounds the cache)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
            self._token_texts[token_id] = text
        return text


class Guard:
    """Pure ASGI middleware (it must not buffer streamed responses): the API key on /v1/*, the request-size limit,
    and per-path status counts for /metrics."""

    def __init__(self, app: Any, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status_seen = [500]

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
            await send(message)

        try:
            key = self.state.config.api_key
            headers = dict(scope["headers"])
            if key and (path.startswith("/v1/") or path in KEYED_PATHS):
                given = headers.get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                    return await _error(counting_send, ApiError(401, "missing or wrong API key; send the header "
                                                                     "'Authorization: Bearer <key>'", None,
                                                                "authentication_error"))
            limit = self.state.config.max_request_bytes
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                return await _error(counting_send, _too_large(int(declared), limit))
            body, more = b"", True
            deadline = time.monotonic() + self.state.config.request_timeout_s
            while more:  # read the whole body up front (bounded in size and time): a chunked upload cannot exceed
                # the limit, and a client sending a byte at a time cannot hold its connection
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    return await _error(counting_send, ApiError(
                        408, f"the request body did not arrive within {self.state.config.request_timeout_s:g} s "
                             f"(--header-timeout)", None, "timeout_error"))
                if message["type"] != "http.request":
                    return  # the client left before sending its body
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await _error(counting_send, _too_large(len(body), limit))
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: http.disconnect when the client goes away

            await self.app(scope, replay, counting_send)
        finally:
            self.state.metrics.count_http(path_label(path), status_seen[0])


# With --api-key: /v1/*, /pooling (vLLM serves it at the root) and the OpenAPI schema need the key; /health (probes)
# and /metrics (scrapers; counters only, no request content, as vLLM leaves it) stay open. docs/server.md says so.
KEYED_PATHS = {"/openapi.json", "/pooling"}
KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/verify", "/v1/models", "/health",
               "/metrics", "/ping", "/version", "/tokenize", "/detokenize", "/pooling", "/v1/sessions",
               "/v1/sessions/{id}", "/v1/sessions/{id}/steps", "/v1/sessions/{id}/fork"}
# /v1/models/{id} is counted under "other" in /metrics: one label value per path we serve, never client-chosen.


def path_label(path: str) -> str:
    """The path as /metrics counts it and BODY_MODELS names it: a session's id becomes "{id}"."""
    if path.startswith("/v1/sessions/"):
        rest = path[len("/v1/sessions/"):].split("/")
        path = "/v1/sessions/{id}" + "".join("/" + p for p in rest[1:])
    return path if path in KNOWN_PATHS else "other"


def _check_model_name(state: ServerState, name: str | None) -> None:
    if name is not None and name not in state.model_names:
        raise ApiError(404, f"model {name!r} is not served here; available: {[state.model_name]}", "model",
                       "not_found_error")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes (--max-request-bytes)")


async def _error(send: Any, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError, path: str) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        whole_body = err.get("type") in ("json_invalid", "model_attributes_type", "dict_type")
        param = param or (loc[0] if loc and not whole_body else None)  # json_invalid's loc is a byte offset
        where = ".".join(loc) or "body"
        if err.get("type") == "value_error" and "lone surrogate" in str(err.get("msg")):
            text = str(err.get("msg")).removeprefix("Value error, ")
            parts.append(text)
            param = param or text.split(" ", 1)[0].split(".", 1)[0].split("[", 1)[0]
        elif err.get("type") == "value_error" and not loc:  # a check across fields (VerifyRequest's two forms)
            parts.append(str(err.get("msg")).removeprefix("Value error, "))
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif whole_body or not loc:
            parts.append(f"the body is not a JSON object ({err.get('msg')})")
        else:
            parts.append(f"{where}: {err.get('msg')} (got {json.dumps(err.get('input'), default=str)[:80]})")
    model = BODY_MODELS.get(path_label(path))
    accepted = f"; accepted fields: {accepted_fields(model)}" if model else ""
    return "; ".join(dict.fromkeys(parts)) + accepted, param


def build_app(llm: Any, config: ServerConfig) -> FastAPI:
    state = ServerState(llm, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start()
        yield
        # uvicorn has drained in-flight requests (up to its graceful-shutdown timeout); answer what is left.
        state.loop.stop(timeout=10)
        state.verify_executor.shutdown(wait=False, cancel_futures=True)
        state.sessions.close_all()  # their code sandboxes (GenPRM); pins go with the engine

    app = FastAPI(title="prmkern", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.prmkern = state
    app.add_middleware(Guard, state=state)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 400 for a body it cannot parse (bad UTF-8, nesting too deep), 404/405 for unknown routes.
        message = str(exc.detail)
        if exc.status_code == 400:
            model = BODY_MODELS.get(path_label(request.url.path))
            message = (f"the body is not valid JSON ({exc.detail}); accepted: a JSON object"
                       + (f" with fields {accepted_fields(model)}" if model else ""))
        elif exc.status_code in (404, 405):
            message = f"{exc.detail}: {request.method} {request.url.path}; served: {', '.join(sorted(KNOWN_PATHS))}"
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request.url.path)
        return JSONResponse(ApiError(400, message, param).body(), status_code=400)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(state, req, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, req, request)

    @app.post("/v1/responses")
    async def responses_route(req: ResponsesRequest, request: Request):
        return await create_response(state, req, request)

    @app.post("/v1/verify")
    async def verify_route(req: VerifyRequest, request: Request):
        return await verify(state, req, request)

    @app.post("/pooling")
    async def pooling_route(req: PoolingRequest, request: Request):
        return await create_pooling(state, req, request)

    @app.post("/v1/sessions")
    async def session_open_route(req: SessionOpenRequest):
        return await open_session(state, req)

    @app.post("/v1/sessions/{sid}/steps")
    async def session_step_route(sid: str, req: SessionStepRequest):
        return await add_step(state, sid, req)

    @app.post("/v1/sessions/{sid}/fork")
    async def session_fork_route(sid: str):
        return await fork_session(state, sid)

    @app.get("/v1/sessions/{sid}")
    async def session_get_route(sid: str, include_chains: bool = True):
        return await get_session(state, sid, include_chains)

    @app.delete("/v1/sessions/{sid}")
    async def session_delete_route(sid: str):
        return await delete_session(state, sid)

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "prmkern",
                "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in state.model_names:
            raise ApiError(404, f"model {model_id!r} is not served here; available: {[state.model_name]}", "model",
                           "not_found_error")
        return model_card()

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    # vLLM's (SageMaker's) liveness route: 200 while the engine loop runs. One operation id per method (one
    # api_route for both gave the OpenAPI schema a duplicate id, and FastAPI a warning).
    @app.get("/ping", operation_id="ping_get")
    @app.post("/ping", operation_id="ping_post")
    async def ping():
        return await health()

    @app.get("/version")
    async def version_route():
        return version()

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest):
        _check_model_name(state, req.model)
        return await json_response(tokenize, state, req)  # a megabyte prompt takes seconds: not on the event loop

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest):
        _check_model_name(state, req.model)
        return await json_response(detokenize, state, req)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engine, state.loop),
                                 media_type="text/plain; version=0.0.4")

    return app

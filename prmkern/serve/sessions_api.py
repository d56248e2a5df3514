"""/v1/sessions: forkable verification sessions (prmkern/verify/sessions.py) over HTTP.

    POST   /v1/sessions              {"problem", "index"?, format settings as /v1/verify}  -> {"id", ...}
    POST   /v1/sessions/{id}/steps   {"text"}   -> the step's verdicts (step, score, p_correct, verdicts, solution)
    POST   /v1/sessions/{id}/fork               -> {"id": the child's id, ...}
    GET    /v1/sessions/{id}                    -> the result so far (as /v1/verify answers one solution)
    DELETE /v1/sessions/{id}                    -> {"id", "deleted": true}

Every session of the server belongs to one SessionManager, so the pinned-KV limits (SessionLimits: sessions holding
pins, blocks pinned) bound them all; its block manager is `LoopBlockManager`, which pins and unpins on the engine
loop's thread (the only thread that touches the engine). A step runs in a verify worker thread against `LoopLLM`,
like a /v1/verify call: steps of different sessions, verify calls and completions share the engine's continuously
batched steps and its prefix cache. Each session carries its own Verifier (its format settings); its forks share it.

Limits: at most `max_sessions` sessions are open; opening or forking past it closes the least recently used idle
session, whose id then answers 404 saying so. One session runs one step at a time (a second is a 409); a fork, GET
or DELETE of a session waits for its running step (on the event loop, holding no thread). A step whose text with
the session's is longer than the context is refused (400 naming `text`) and leaves the session as it was; one that
fails once running (an engine error, a verifier prompt past the context) closes its session alone (its chains may
be half extended) and answers the error; the server goes on. A step keeps running when its client goes away (its result stays in the session). Sessions ignore the server's
--budget-tokens, --stop-at-first-error and adaptive chain count (--chains-min: they do not apply to sessions).
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

from pydantic import Field, StrictInt, StrictStr

from prmkern.serve.engine_loop import EngineLoop, Overloaded
from prmkern.serve.protocol import ApiError, BadRequest, VerifySettings, _Request, _StrictBody, overloaded
from prmkern.serve.responses import json_response
from prmkern.serve.verify_api import (TEMPLATE_TOKENS, VERIFY_OVERRIDES, LoopLLM, _check_code_execution,
                                      named_field, prompt_tokens, verify_config)
from prmkern.verify.protocols import Verifier
from prmkern.verify.sessions import SessionClosed, SessionLimits, SessionManager, StepVerdicts, VerifySession


class SessionOpenRequest(VerifySettings):
    """POST /v1/sessions: the problem, the record index whose seeds the session uses, and /v1/verify's format
    settings (budget_tokens and stop_at_first_error do not apply to sessions)."""

    problem: StrictStr
    index: StrictInt = Field(default=0, ge=0)


class SessionStepRequest(_Request, _StrictBody):
    """POST /v1/sessions/{id}/steps: the next step's text."""

    text: StrictStr


class LoopBlockManager:
    """The engine's BlockManager as SessionManager uses it, each call run on the engine loop's thread. Unpins do not
    wait (they run before the loop's next step, in order with every other call)."""

    def __init__(self, loop: EngineLoop, block_manager: Any):
        self.loop, self.bm = loop, block_manager
        self.num_blocks = block_manager.num_blocks

    def pin(self, token_ids: list[int]) -> list[int]:
        return self.loop.call(lambda: self.bm.pin(token_ids))

    def pin_many(self, token_lists: list[list[int]]) -> list[list[int]]:
        """Several pins in one trip to the loop thread (a per-step session pins one list per chain)."""
        return self.loop.call(lambda: [self.bm.pin(ids) for ids in token_lists])

    def pin_blocks(self, block_ids: list[int]) -> None:
        self.loop.call(lambda: self.bm.pin_blocks(block_ids))

    def unpin(self, block_ids: list[int]) -> None:
        self.loop.call(lambda: self.bm.unpin(block_ids), wait=False)


@dataclasses.dataclass(eq=False)
class _Entry:
    session: VerifySession
    parent: str | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # held while a step runs


class SessionStore:
    """The server's open sessions by id, least recently used first, and why recently closed ones are gone."""

    GONE_KEPT = 4096  # closed ids remembered for their 404's reason

    def __init__(self, state: Any, max_sessions: int, limits: SessionLimits | None):
        engine_bm = getattr(state.engine, "block_manager", None)
        self.manager = SessionManager(None, limits or SessionLimits(),
                                      block_manager=LoopBlockManager(state.loop, engine_bm)
                                      if engine_bm is not None else None)
        if self.manager.limits.max_pinned_blocks is None and engine_bm is not None:
            self.manager.limits.max_pinned_blocks = engine_bm.num_blocks // 2
        self.max_sessions = max_sessions
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.gone: OrderedDict[str, str] = OrderedDict()
        self.closed_for_room = 0
        self._lock = threading.Lock()

    def get(self, sid: str) -> _Entry:
        with self._lock:
            entry = self.entries.get(sid)
            if entry is not None:
                self.entries.move_to_end(sid)
                return entry
            why = self.gone.get(sid)
        if why is not None:
            raise ApiError(404, f"session {sid!r} is closed: {why}", "id", "not_found_error")
        raise ApiError(404, f"session {sid!r} is not open on this server; open one with POST /v1/sessions",
                       "id", "not_found_error")

    def add(self, session: VerifySession, parent: str | None = None) -> str:
        """Registers a session under a new id, closing the least recently used idle sessions past max_sessions."""
        sid = f"vsess-{uuid.uuid4().hex}"
        victims = []
        with self._lock:
            self.entries[sid] = _Entry(session, parent)
            for other, entry in list(self.entries.items()):
                if len(self.entries) <= self.max_sessions:
                    break
                if other != sid and entry.lock.acquire(blocking=False):  # never a session running a step
                    del self.entries[other]
                    self._remember(other, f"closed to make room for newer sessions (this server keeps at most "
                                          f"{self.max_sessions} open, --max-sessions)")
                    victims.append(entry)
            if len(self.entries) > self.max_sessions:  # every other session is running a step
                del self.entries[sid]
                full = True
            else:
                full = False
                self.closed_for_room += len(victims)
        for entry in victims:
            entry.session.close()
            entry.lock.release()
        if full:
            session.close()
            raise overloaded(f"{self.max_sessions} sessions are open and all are running steps (--max-sessions); "
                             f"retry later or delete sessions")
        return sid

    def remove(self, sid: str, why: str) -> _Entry | None:
        with self._lock:
            entry = self.entries.pop(sid, None)
            self._remember(sid, why)
        return entry

    def _remember(self, sid: str, why: str) -> None:
        self.gone[sid] = why
        while len(self.gone) > self.GONE_KEPT:
            self.gone.popitem(last=False)

    def close_all(self) -> None:
        with self._lock:
            entries, self.entries = list(self.entries.values()), OrderedDict()
        for entry in entries:
            entry.session.close()


def _session_body(state: Any, sid: str, entry: _Entry, include_chains: bool) -> dict[str, Any]:
    s = entry.session
    body = s.result().to_json(state.tokenizer, include_chains=include_chains)
    body.pop("id", None)
    return {"id": sid, "object": "verification.session", "model": state.model_name, "format": s.verifier.fmt.name,
            "num_chains": s.verifier.config.num_chains, "index": s.index, "parent": entry.parent,
            "steps": list(s.steps), "evicted": s.evicted, **body}


def step_body(state: Any, sid: str, entry: _Entry, v: StepVerdicts) -> dict[str, Any]:
    """A step's answer: the StepVerdicts fields, `solution` the result so far without chains."""
    solution = entry.session.result().to_json(state.tokenizer, include_chains=False)
    solution.pop("id", None)
    return {"id": sid, "object": "verification.session.step", "step": v.step, "score": v.score,
            "p_correct": v.p_correct, "verdicts": v.verdicts, "evicted": entry.session.evicted,
            "solution": solution}


async def open_session(state: Any, req: SessionOpenRequest) -> Any:
    if req.model is not None and req.model not in state.model_names:
        raise ApiError(404, f"model {req.model!r} is not served here; available: {[state.model_name]}",
                       "model", "not_found_error")
    if not req.problem.strip():
        raise BadRequest("problem is empty; accepted: a non-empty string", "problem")
    if await asyncio.to_thread(prompt_tokens, state, req.problem) is None:  # bounded tokenizing, off the loop
        raise BadRequest(f"problem is longer than the context: more than {state.max_model_len - 1} tokens "
                         f"(max_model_len {state.max_model_len}); accepted: a problem that fits", "problem")
    fields = {k: getattr(req, k) for k in ("format", "num_chains", "temperature", "top_p", "max_tokens", "method",
                                           "threshold", "seed", "scoring")}
    _check_code_execution(state, SimpleNamespace(**fields))
    # every other field verify_config reads (VERIFY_OVERRIDES) is the server's
    overrides = SimpleNamespace(**{**{k: None for k in VERIFY_OVERRIDES}, **fields})
    config = verify_config(state.verify_defaults, overrides, state.max_n, state.max_model_len - 1,
                           state.verify_options)
    # Budget forcing, stopping at the first error and the adaptive chain count are whole-solution settings: sessions
    # run without them (a session's K is num_chains).
    config = dataclasses.replace(config, budget_tokens=None, stop_at_first_error=False, chains_min=None,
                                 chains_max=None)
    try:
        verifier = Verifier(LoopLLM(state.loop, state.tokenizer, threading.Event()), config)
        session = state.sessions.manager.open(req.problem, req.index, verifier=verifier)
    except ValueError as e:
        raise BadRequest(str(e), named_field(str(e), VERIFY_OVERRIDES)) from e
    sid = state.sessions.add(session)
    return {"id": sid, "object": "verification.session", "model": state.model_name, "format": config.format.name,
            "num_chains": config.num_chains, "index": req.index, "scoring": config.scoring, "steps": []}


def _step_cost(state: Any, session: VerifySession, text: str) -> int:
    """The tokens one step may put in the engine (as /v1/verify's estimate for the whole solution so far); a 400
    naming `text` when the solution with this step no longer fits the context (the session stays as it was)."""
    words = session.problem + "\n".join(session.steps) + text
    prompt = prompt_tokens(state, words)
    if prompt is None:
        raise BadRequest(f"the problem and the steps with this one are longer than the context: more than "
                         f"{state.max_model_len - 1} tokens (max_model_len {state.max_model_len}); accepted: a "
                         f"solution that fits", "text")
    c = session.verifier.config
    return prompt + TEMPLATE_TOKENS + c.num_chains * c.max_tokens


async def add_step(state: Any, sid: str, req: SessionStepRequest) -> Any:
    start = time.perf_counter()
    entry = state.sessions.get(sid)
    session = entry.session
    if not req.text.strip():
        raise BadRequest("text is empty; accepted: the step's non-empty text", "text")
    if len(session.steps) >= state.max_steps:
        raise BadRequest(f"session {sid!r} has {len(session.steps)} steps; accepted: at most {state.max_steps} "
                         f"(--max-steps)", "text")
    if not entry.lock.acquire(blocking=False):
        raise ApiError(409, f"session {sid!r} is running a step; the steps of one session run one after another "
                            f"(fork it to try several next steps at once)", "id", "conflict_error")
    try:
        if session.closed:  # closed between get() and the lock (deleted, or closed to make room)
            state.sessions.get(sid)
        cost = await asyncio.to_thread(_step_cost, state, session, req.text)  # tokenizing: off the event loop
        state.loop.reserve(cost)
    except Overloaded as e:
        entry.lock.release()
        state.metrics.overloaded += 1
        raise overloaded(str(e)) from e
    except BaseException:
        entry.lock.release()
        raise

    def job() -> StepVerdicts:  # owns the lock from here: a client that leaves does not end the step
        try:
            return session.add_step(req.text)
        finally:
            state.loop.unreserve(cost)
            entry.lock.release()
    try:
        verdicts = await asyncio.get_running_loop().run_in_executor(state.verify_executor, job)
    except Overloaded as e:  # the engine loop refused a round (stopping, or its request bound): this session ends
        state.sessions.remove(sid, f"its step {len(session.steps) - 1} was refused ({e})")
        raise overloaded(f"{e}; session {sid!r} is closed (its chains may be half extended)") from e
    except (ValueError, RuntimeError, SessionClosed) as e:
        if not session.closed:  # refused before the session changed: it stays open
            raise BadRequest(str(e), "text") from e
        # this request's own error (a prompt past the context, a step the format cannot take): this session ends
        state.sessions.remove(sid, f"its step {len(session.steps) - 1} failed ({e})")
        raise BadRequest(f"step {len(session.steps) - 1} failed: {e}; session {sid!r} is closed (its chains "
                         f"may be half extended)", "text") from e
    except Exception as e:  # noqa: BLE001 - the engine failed this step: this session alone ends
        status = e.status if isinstance(e, ApiError) else 500
        state.sessions.remove(sid, f"its step {len(session.steps) - 1} failed ({e})")
        raise ApiError(status, f"step {len(session.steps) - 1} failed: {type(e).__name__}: {e}; session "
                               f"{sid!r} is closed (its chains may be half extended)", None, "server_error") from e
    state.metrics.observe_latency("session_step", time.perf_counter() - start)
    return await json_response(step_body, state, sid, entry, verdicts)


async def _with_session(state: Any, sid: str, fn: Any) -> Any:
    """fn(entry) in a worker thread once the session's running step, if any, is done.

    The wait for the step holds no thread: the lock is tried from the event loop, with a sleep between tries (a
    thread blocked on it would hold one of the default executor's few workers, which every JSON answer of the
    server is rendered in, so a few polls of a running session stalled everyone's completions). Once taken, the
    lock belongs to the job, which releases it; the job is shielded, so a client that leaves cannot strand it."""
    entry = state.sessions.get(sid)
    delay = 0.002
    while not entry.lock.acquire(blocking=False):
        await asyncio.sleep(delay)
        delay = min(2 * delay, 0.05)

    def job() -> Any:
        try:
            if entry.session.closed:
                state.sessions.get(sid)  # 404 with the reason
            return fn(entry)
        finally:
            entry.lock.release()
    try:
        work = asyncio.get_running_loop().run_in_executor(None, job)
    except BaseException:
        entry.lock.release()
        raise
    return await asyncio.shield(work)


async def fork_session(state: Any, sid: str) -> Any:
    child = await _with_session(state, sid, lambda entry: entry.session.fork())
    child_id = state.sessions.add(child, parent=sid)
    return {"id": child_id, "object": "verification.session", "parent": sid, "steps": list(child.steps),
            "format": child.verifier.fmt.name, "index": child.index}


async def get_session(state: Any, sid: str, include_chains: bool) -> Any:
    return await _with_session(state, sid, lambda entry: _session_body(state, sid, entry, include_chains))


async def delete_session(state: Any, sid: str) -> Any:
    def delete(entry: _Entry) -> None:
        if state.sessions.remove(sid, "deleted by DELETE /v1/sessions/{id}") is not None:
            entry.session.close()
    await _with_session(state, sid, delete)
    return {"id": sid, "object": "verification.session.deleted", "deleted": True}

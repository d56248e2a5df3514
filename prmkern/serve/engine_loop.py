"""The one engine loop behind the server: a dedicated thread that owns the LLMEngine and steps it.

Any thread may `submit` a request or `abort` one; submissions wait in an inbox and join the running batch between
two engine steps (continuous batching across connections: the engine's scheduler admits them at its next step).
Results flow back through a per-request `sink` callable, called on the loop thread with one event at a time:
`ChainDelta` (new tokens of one chain, only when deltas are wanted), `ChainDone`, then `RequestDone`, or a single
`RequestFailed`. Only this thread touches the engine, so the engine needs no locks. Steps go through
prmkern/engine/driver.py, the step driver LLM.generate uses too: a failed step fails the requests it ran.

Admission is bounded in tokens and in requests: a submission costs its prompt tokens plus n * max_tokens, and
past `max_pending_tokens` (or `max_pending` requests) `submit` raises `Overloaded` at once instead of queueing
without limit. Below the bound every submission queues in the engine's own scheduler (first come, first served,
completions and verification chains alike) however many are waiting. A multi-round caller (a verify call)
`reserve`s its whole estimated cost once and submits its rounds against the reservation, so that it is refused
before its first round or not at all. `call(fn)` runs fn on the loop thread between two steps: what else must touch
the engine (verification sessions pin and unpin prefix-cache blocks: serve/sessions_api.py). Knows nothing of HTTP,
JSON or tokenizers.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from prmkern.engine import driver
from prmkern.outputs import CompletionOutput, RequestOutput
from prmkern.sampling_params import SamplingParams

log = logging.getLogger("prmkern.serve")


class Overloaded(RuntimeError):
    """Too many requests in flight (or the loop is stopping); the caller answers 503 and the client retries."""


@dataclass
class ChainDelta:
    index: int  # chain index within the request
    token_ids: list[int]  # tokens generated since the last delta of this chain
    logprobs: list[Any] | None  # the engine's per-token log-probability entries for those tokens
    token_logprobs: list[dict[int, float]] | None  # {id: logprob} for SamplingParams.logprob_token_ids
    text: str | None = None  # with stop strings: the engine's text so far, the text its stop check reads
    hide_last: bool = False  # the last token ended the chain as a stop token: its text is not output (as vLLM)


@dataclass
class ChainDone:
    output: CompletionOutput  # the chain's final output (text cut at its stop string)


@dataclass
class RequestDone:
    output: RequestOutput


@dataclass
class RequestFailed:
    message: str
    status: int  # 400: the request itself is invalid; 500: the engine failed; 503: the server is stopping


Event = ChainDelta | ChainDone | RequestDone | RequestFailed


@dataclass(eq=False)
class Stream:
    """One submitted request, as its submitter sees it."""

    prompt: str | list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    want_deltas: bool
    request: Any = None  # the engine's Request, once admitted (loop thread)
    sent: dict[int, int] = field(default_factory=dict)  # chain index -> output tokens already sent as deltas
    chains_done: set[int] = field(default_factory=set)
    cancelled: bool = False
    closed: bool = False  # a final event was sent (loop thread)
    released: bool = False  # no longer counted in the loop's pending requests
    cost: int = 0  # tokens counted in the loop's pending tokens (0: covered by a reservation)
    pooling: Any = None  # PoolingParams: a pooling request (RequestDone carries a PoolingRequestOutput)


class EngineLoop:
    def __init__(self, engine: Any, max_pending: int = 512, max_pending_tokens: int = 1 << 20):
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} is invalid; accepted: an int >= 1")
        if max_pending_tokens < 1:
            raise ValueError(f"max_pending_tokens={max_pending_tokens} is invalid; accepted: an int >= 1")
        self.engine = engine
        self.max_pending = max_pending
        self.max_pending_tokens = max_pending_tokens
        self._pending_tokens = 0  # costs of unanswered submissions and live reservations (guarded by _cond)
        self._cond = threading.Condition()
        self._inbox: list[Stream] = []
        self._aborts: list[Stream] = []
        self._pending = 0  # submitted and not yet closed (guarded by _cond)
        self._stopping = False
        self._calls: list[tuple[Callable[[], Any], Future]] = []  # call(): run on the loop thread (guarded by _cond)
        self._exited = False  # the loop thread returned: call() runs inline (guarded by _cond)
        self._active: dict[Any, Stream] = {}  # request_id -> stream (loop thread only)
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="prmkern-engine-loop", daemon=True)

    # -- any thread ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests submitted and not yet answered (queued in the engine or running)."""
        return self._pending

    @property
    def pending_tokens(self) -> int:
        """Tokens admitted and not yet released: prompts + n * max_tokens of unanswered requests, reservations."""
        return self._pending_tokens

    @staticmethod
    def cost(prompt: str | list[int], params: SamplingParams | None) -> int:
        """A submission's tokens for admission: its prompt (text: one token per 4 characters, at least 1) and
        the most its chains may generate (none for a pooling request: params None)."""
        prompt_tokens = len(prompt) if isinstance(prompt, list) else max(1, len(prompt) // 4)
        return prompt_tokens + (params.n * (params.max_tokens or 0) if params is not None else 0)

    def _check_room(self, cost: int) -> None:
        """Caller holds _cond. A request that alone exceeds the bound still runs when nothing else is admitted."""
        if self._stopping:
            raise Overloaded("the server is shutting down and accepts no new requests")
        if self._pending_tokens and self._pending_tokens + cost > self.max_pending_tokens:
            raise Overloaded(f"server overloaded: {self._pending_tokens} tokens admitted and this call needs {cost} "
                             f"(limit {self.max_pending_tokens}, --max-pending-tokens); retry later")

    def reserve(self, cost: int) -> None:
        """Admits `cost` tokens for a caller that will submit with reserved=True; raises Overloaded when full."""
        with self._cond:
            self._check_room(cost)
            self._pending_tokens += cost

    def unreserve(self, cost: int) -> None:
        with self._cond:
            self._pending_tokens -= cost

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, prompt: str | list[int], params: SamplingParams | None, sink: Callable[[Event], None],
               want_deltas: bool = False, reserved: bool = False, pooling: Any = None) -> Stream:
        """reserved: the tokens were admitted by reserve() (a verify call's rounds): only the request count binds.
        pooling: PoolingParams for a pooling request (params None; it answers one RequestDone, no deltas)."""
        stream = Stream(prompt, params, sink, want_deltas and pooling is None, pooling=pooling)
        stream.cost = 0 if reserved else self.cost(prompt, params)
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down and accepts no new requests")
            if self._pending >= self.max_pending:
                raise Overloaded(f"server overloaded: {self._pending} requests in flight (limit {self.max_pending}, "
                                 f"--max-pending); retry later")
            if not reserved:
                self._check_room(stream.cost)
            self._pending += 1
            self._pending_tokens += stream.cost
            self._inbox.append(stream)
            self._cond.notify()
        return stream

    def abort(self, stream: Stream) -> None:
        """Stops the request and frees its KV blocks (between steps); its sink gets no further events."""
        with self._cond:
            stream.cancelled = True
            self._aborts.append(stream)
            self._cond.notify()

    def call(self, fn: Callable[[], Any], wait: bool = True) -> Any:
        """Runs fn() on the loop thread between two engine steps (only that thread touches the engine) and returns
        its result (its exception is raised here); wait=False returns the Future at once. Before the loop starts
        or after it ended, fn runs here (no other thread steps the engine then)."""
        future: Future = Future()
        with self._cond:
            queued = self._thread.is_alive() and not self._exited
            if queued:
                self._calls.append((fn, future))
                self._cond.notify()
        if not queued:
            _run_call(fn, future)
        return future.result() if wait else future

    def stop(self, timeout: float | None = None) -> None:
        """Answers every unfinished request with RequestFailed(503) and ends the thread. Callers that want in-flight
        requests to finish wait for them first (the HTTP server drains its connections before calling this)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._calls or self._stopping or engine.has_unfinished()):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
                stopping = self._stopping
                if stopping:  # later call()s run inline
                    self._exited = True
                    calls, self._calls = calls + self._calls, []
            for fn, future in calls:
                _run_call(fn, future)
            for stream in inbox:
                self._admit(stream)
            for stream in aborts:
                self._abort(stream)
            if stopping:
                for stream in list(self._active.values()):
                    self._abort(stream)
                    self._close(stream, RequestFailed("the server shut down before this request finished", 503))
                return
            if not engine.has_unfinished():
                continue
            result = driver.step(engine)  # the engine's one step driver: the same failure rule as LLM.generate
            if result.error is not None:  # a failed step must not kill the server: fail what ran
                log.error("engine step failed", exc_info=result.error)
                message = f"engine error: {result.message()}"
                streams = list(self._active.values())
                driver.fail(engine, [s.request for s in streams], message)
                for stream in streams:
                    self._abort(stream)
                    self._close(stream, RequestFailed(message, 500))
                continue
            self.steps += 1
            self._publish(result.finished)

    def _admit(self, stream: Stream) -> None:
        if stream.cancelled:
            self._release(stream)
            return
        try:
            request = self.engine.add_request(stream.prompt, stream.params, pooling=stream.pooling)
        except Exception as e:  # noqa: BLE001 - add_request validates; anything else is still this request's fault
            self._close(stream, RequestFailed(f"{type(e).__name__}: {e}", 400))
            return
        if request.error is not None:
            self._close(stream, RequestFailed(request.error, 400))
            return
        stream.request = request
        self._active[request.request_id] = stream

    def _abort(self, stream: Stream) -> None:
        request = stream.request
        if request is None or self._active.pop(request.request_id, None) is None:
            return
        if not request.finished:
            self.engine.abort_request(request)
        if stream.cancelled:
            self._release(stream)

    def _publish(self, finished: list[Any]) -> None:
        engine = self.engine
        for stream in self._active.values():
            if not stream.want_deltas:
                continue
            for seq in stream.request.seqs:
                sent = stream.sent.get(seq.chain_index, 0)
                n_out = seq.num_output_tokens
                if n_out > sent:
                    stream.sent[seq.chain_index] = n_out
                    self._send(stream, ChainDelta(
                        seq.chain_index, seq.output_token_ids[sent:],
                        list(seq.logprobs[sent:n_out]) if seq.logprobs else None,
                        list(seq.token_logprobs[sent:n_out]) if seq.token_logprobs else None,
                        seq.text if seq.params.stop_strings else None, seq.hides_stop_token))
        done_requests: dict[Any, Any] = {}
        for seq in finished:
            request = seq.request
            stream = self._active.get(request.request_id)
            if stream is None:
                continue
            if request.error is None and stream.want_deltas and seq.chain_index not in stream.chains_done:
                stream.chains_done.add(seq.chain_index)
                out = engine.output(request)
                self._send(stream, ChainDone(next(o for o in out.outputs if o.index == seq.chain_index)))
            if request.finished:
                done_requests[request.request_id] = request
        for request_id, request in done_requests.items():
            stream = self._active.pop(request_id)
            if request.error is not None:  # failed mid-way (the engine freed its blocks): an engine-side error
                self._close(stream, RequestFailed(f"engine error: {request.error}", 500))
            elif stream.pooling is not None:
                self._close(stream, RequestDone(engine.pooling_output(request)))
            else:
                self._close(stream, RequestDone(engine.output(request)))

    def _close(self, stream: Stream, event: Event) -> None:
        if not stream.closed:
            stream.closed = True
            if not stream.cancelled:
                self._send(stream, event)
            self._release(stream)

    @staticmethod
    def _send(stream: Stream, event: Event) -> None:
        try:
            stream.sink(event)
        except Exception:  # noqa: BLE001 - a consumer that went away must not stop the loop
            log.exception("delivering an event failed")

    def _release(self, stream: Stream) -> None:
        with self._cond:
            if not stream.released:
                stream.released = True
                self._pending -= 1
                self._pending_tokens -= stream.cost


def _run_call(fn: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as e:  # noqa: BLE001 - the caller gets it from the Future; the loop goes on
        future.set_exception(e)

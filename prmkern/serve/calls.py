"""One HTTP call's requests in the engine loop, seen from the asyncio side; and the incremental text of a chain.

`EngineCall` submits a call's prompts (one engine request each), receives the loop's events on an asyncio queue,
and aborts every unfinished request when the client disconnects or the handler ends early, so their KV blocks
are freed at the next step. `ChainText` turns a chain's token deltas into text deltas for streaming, holding back
text that a stop string may still cut and incomplete UTF-8 characters.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from prmkern.sampling_params import SamplingParams
from prmkern.serve.engine_loop import EngineLoop, Event, Overloaded, Stream


class EngineCall:
    def __init__(self, loop: EngineLoop, on_abort: Callable[[], None] | None = None):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.streams: list[Stream] = []
        self.finished: set[int] = set()
        self._aio = asyncio.get_running_loop()
        self._on_abort = on_abort
        self._watch: asyncio.Task | None = None
        self.disconnected = asyncio.Event()

    def submit(self, prompts: list[list[int]], params: SamplingParams, want_deltas: bool) -> None:
        """Submits every prompt, or none: on Overloaded the ones already submitted are aborted and it re-raises."""
        try:
            for i, prompt in enumerate(prompts):
                def sink(event: Event, i: int = i) -> None:
                    self._aio.call_soon_threadsafe(self.queue.put_nowait, (i, event))
                self.streams.append(self.loop.submit(prompt, params, sink, want_deltas))
        except Overloaded:
            self.abort()
            raise

    def mark_finished(self, i: int) -> None:
        self.finished.add(i)

    def abort(self) -> None:
        """Aborts every request of this call that has not finished (no-op for finished ones)."""
        aborted = False
        for i, stream in enumerate(self.streams):
            if i not in self.finished and not stream.cancelled:
                self.loop.abort(stream)
                aborted = True
        if aborted and self._on_abort is not None:
            self._on_abort()

    def watch_disconnect(self, receive: Callable[[], Any]) -> None:
        """Starts a task that aborts this call when the client disconnects (an ASGI http.disconnect message)."""
        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected.set()
                    self.abort()
                    return
        self._watch = asyncio.create_task(watch())

    def close(self) -> None:
        """Ends the disconnect watcher and aborts whatever has not finished (the handler is leaving)."""
        if self._watch is not None:
            self._watch.cancel()
        self.abort()

    async def next_event(self) -> tuple[int, Event] | None:
        """The next event, or None once the client has disconnected."""
        get = asyncio.ensure_future(self.queue.get())
        gone = asyncio.ensure_future(self.disconnected.wait())
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            gone.cancel()
            return get.result()
        get.cancel()
        return None


class ChainText:
    """The text of one chain as it streams: `push` new tokens, get the text that can be sent now.

    With stop strings the text is the engine's own (what its stop check has read), less the last
    len(longest stop) - 1 characters: a stop string found later starts no earlier than that, so what was sent is
    always a prefix of the final, cut text. Without stop strings it is the decoded tokens less an incomplete
    trailing character."""

    def __init__(self, tokenizer: Any, params: SamplingParams, prefix: str = ""):
        self.tok = tokenizer
        self.skip_special = params.skip_special_tokens
        self.holdback = max((len(s) for s in params.stop_strings), default=1) - 1  # chars a stop string may cut
        self.token_ids: list[int] = []
        self.sent = ""  # what the client has received: an echoed prompt goes out with the first text
        self.prefix = prefix

    def push(self, token_ids: list[int], engine_text: str | None = None, hide_last: bool = False) -> str:
        """hide_last: the newest token is the stop token that ended the chain, whose text is not output."""
        self.token_ids.extend(token_ids)
        if engine_text is not None:
            text = self.prefix + engine_text
            safe = text[:max(len(self.prefix), len(text) - self.holdback)]
        else:
            shown = self.token_ids[:-1] if hide_last else self.token_ids
            text = self.prefix + self.tok.decode(shown, skip_special_tokens=self.skip_special)
            safe = text.rstrip("\ufffd")  # an incomplete multi-byte character: wait for its other bytes
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            delta, self.sent = safe[len(self.sent):], safe
            return delta
        return ""

    def finish(self, final_text: str) -> str:
        """The rest of the chain's final text (as the engine cut it at its stop string)."""
        final = self.prefix + final_text
        # Sent text is a prefix of the final text: holdback keeps back anything a stop string could still cut.
        delta, self.sent = final[len(self.sent):], final
        return delta

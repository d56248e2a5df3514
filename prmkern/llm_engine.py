"""`LLM.llm_engine`: the engine as a vLLM script drives it, in vLLM's LLMEngine names and argument order.

    engine = llm.llm_engine
    engine.add_request("a", "prompt", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():          # RequestOutputs of the requests this view added, as they stand
            if out.finished: ...

A thin view over prmkern's LLMEngine (prmkern/engine/engine.py), which keeps its own names (add_request(prompt,
params, request_id), step() -> finished sequences) for the code inside prmkern. It adds no scheduling of its own.
"""
from __future__ import annotations

from typing import Any, Iterable

from prmkern.outputs import RequestOutput
from prmkern.sampling_params import SamplingParams


class VLLMEngineView:
    def __init__(self, engine: Any):
        self.engine = engine
        self._live: dict[str, Any] = {}  # request id -> Request, added here and not yet reported finished

    def __getattr__(self, name: str) -> Any:  # stats, metrics, tokenizer, config, ... of the engine itself
        return getattr(self.engine, name)

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams, **_: Any) -> None:
        """vLLM's order: (request_id, prompt, params). A prompt the engine refuses raises ValueError, as vLLM's
        input processing does (prmkern's own add_request records the error on the request instead)."""
        request = self.engine.add_request(prompt, params, request_id=str(request_id))
        if request.error is not None:
            raise ValueError(request.error)
        self._live[request.request_id] = request

    def step(self) -> list[RequestOutput]:
        """One engine step; the RequestOutputs (cumulative, vLLM's default kind) of this view's requests."""
        self.engine.step()
        outs = [self.engine.output(r) for r in self._live.values()]
        for out in outs:
            if out.finished:
                del self._live[out.request_id]
        return outs

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len({s.request.request_id for s in list(self.engine.scheduler.waiting) + self.engine.scheduler.running})

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            self.engine.abort_request(rid)
            self._live.pop(rid, None)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.engine.block_manager.reset_prefix_cache()

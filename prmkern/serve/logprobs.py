"""Log-probabilities and extension fields in OpenAI's and vLLM's JSON shapes, from the engine's outputs.

Entries come from the engine in two forms: a {token_id: Logprob} dict per position (final outputs, vLLM's shape)
or the engine's per-position record with token_id / logprob / top_ids / top_logprobs (streamed deltas); both give
the same JSON. Token texts come from `state.token_text` (cached per id).
"""
from __future__ import annotations

from typing import Any


def lp_entries(state: Any, token_ids: list[int], entries: list[Any] | None, k: int) -> list[tuple]:
    """Per token: (text, logprob, [(alt text, alt logprob)]: the k most likely, best first, then the sampled token
    if it is not among them). Entries are the engine's: a {id: Logprob} dict per position (final outputs) or its
    per-position record with token_id / logprob / top_ids / top_logprobs (streamed deltas); None: no logprob."""
    out = []
    for tid, entry in zip(token_ids, entries or []):
        if entry is None:
            out.append((state.token_text(tid), None, None))
            continue
        if isinstance(entry, dict):
            lp = entry[tid].logprob
            top = sorted(((i, v.logprob) for i, v in entry.items()), key=lambda kv: -kv[1])[:k]
        else:
            lp = entry.logprob
            top = list(zip(entry.top_ids, entry.top_logprobs))[:k]
        if all(i != tid for i, _ in top):
            top.append((tid, lp))
        out.append((state.token_text(tid), lp, [(state.token_text(i), v) for i, v in top]))
    return out


def logprob_dicts(positions: list[dict[int, Any] | None] | None) -> list[dict[str, dict] | None] | None:
    """vLLM's JSON for per-position {id: Logprob} dicts (ids as strings)."""
    if positions is None:
        return None
    return [None if d is None else {str(i): {"logprob": v.logprob, "rank": v.rank, "decoded_token": v.decoded_token}
                                    for i, v in d.items()} for d in positions]


def completion_logprobs(entries: list[tuple], offset: int) -> dict[str, Any]:
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [None if e[2] is None else dict(e[2]) for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[tuple], k: int) -> dict[str, Any]:
    def item(text: str, lp: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in top[:k]]}
                        for t, lp, top in entries]}


def choice_extras(req: Any, token_ids: list[int], token_logprobs: list[dict[int, float]] | None) -> dict[str, Any]:
    """The extension fields of a choice: `token_ids` (return_token_ids) and `requested_logprobs` (per position,
    {id: logprob} for logprob_token_ids, ids as JSON strings)."""
    out: dict[str, Any] = {}
    if req.return_token_ids:
        out["token_ids"] = list(token_ids)
    if req.logprob_token_ids is not None:
        out["requested_logprobs"] = [{str(i): v for i, v in d.items()} for d in token_logprobs or []]
    return out

"""JSON responses rendered off the event loop.

A response can be large (prompt_logprobs over a long prompt: tens of thousands of entries) and turning it into
bytes is pure Python work. Done on the event loop, it stalls every other client, /health included, for as long
as it takes. `json_response(build, *args)` runs `build(*args)` and the JSON encoding in a worker thread
(asyncio's default executor) and returns the finished bytes; the loop only awaits. Same bytes as FastAPI's
JSONResponse (compact separators, UTF-8, NaN refused).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from fastapi.responses import Response


def render_json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


async def json_response(build: Callable[..., Any], *args: Any, status_code: int = 200) -> Response:
    """`build(*args)` (a JSON-able object) rendered in a worker thread, as an application/json Response."""
    body = await asyncio.to_thread(lambda: render_json(build(*args)))
    return Response(body, status_code=status_code, media_type="application/json")

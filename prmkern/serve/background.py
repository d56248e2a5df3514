"""Run the server inside the current process, on a background thread (tests, benchmarks, notebooks).

`serve_in_thread(app)` binds a socket first (port 0: a free port chosen by the OS, so no race with other
processes), runs uvicorn on it in a thread, waits until it answers, yields its base URL, and on exit shuts it down
gracefully (in-flight requests finish, then the engine loop stops). It runs with the same connection limits as
`prmkern serve` (connections.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any, Iterator


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, graceful_s: float = 10.0,
                    startup_timeout_s: float = 30.0, max_connections: int | None = None,
                    header_timeout_s: float = 10.0) -> Iterator[str]:
    import uvicorn

    from prmkern.serve.connections import uvicorn_kwargs
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_s, lifespan="on",
                            **uvicorn_kwargs(max_connections, header_timeout_s))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="prmkern-uvicorn",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port} within {startup_timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(graceful_s + 15)
        sock.close()

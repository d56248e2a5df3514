"""Connections, not requests: how many the server holds, how long one may take to send its request, and how much
the accept loop may log. Everything here is uvicorn configuration; the routes know nothing of it.

* ``LimitedH11Protocol`` (built by ``limited_protocol``): uvicorn's h11 protocol with a cap on open connections,
  kept below the process's file-descriptor limit. A connection over the cap first evicts the oldest connection
  that has no request in progress and none waiting to be read (a half-open or idle keep-alive one); if every
  connection has a request, the newcomer gets HTTP 503 and is closed. A connection must deliver its request headers
  within ``header_timeout_s`` of opening (or of its previous response, on keep-alive), else it is closed: a client
  that opens connections and sends nothing (or a byte at a time) holds nothing for long.
* ``RateLimitedLog``: at most ``burst`` records per message per ``window_s`` on the server's loggers (asyncio's
  "socket.accept() out of system resource" and uvicorn's errors can otherwise repeat thousands of times a second);
  the next record let through says how many were dropped.
* ``connection_limit``: the default cap from RLIMIT_NOFILE (raised to its hard limit first, as vLLM does); the
  listen backlog is sized so that one burst of accepts plus the connections held stays under that limit.

The request body's own deadline is the Guard's (app.py); the response is the routes' business.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import socket
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

SERVER_LOGGERS = ("asyncio", "uvicorn", "uvicorn.error", "uvicorn.access", "prmkern")
_FD_RESERVE = 64  # descriptors kept for the engine itself: model files, sandbox pipes, the event loop, logs


def connection_limit(requested: int | None = None) -> tuple[int, int]:
    """(connection cap, RLIMIT_NOFILE soft limit). Raises the soft limit to the hard one; the default cap leaves
    half of what is above the reserve to the engine (sandbox sessions hold ~6 descriptors each). A requested cap
    that would leave less than the reserve is refused (ValueError naming the flag)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    room = soft - _FD_RESERVE
    if requested is None:
        return max(4, min(4096, room // 2)), soft
    if not isinstance(requested, int) or not 1 <= requested <= room:
        raise ValueError(f"--max-connections {requested} is invalid here; accepted: an int in [1, {room}] "
                         f"(RLIMIT_NOFILE {soft} less {_FD_RESERVE} descriptors kept for the engine)")
    return requested, soft


def _busy(conn: H11Protocol) -> bool:
    """A request is in progress on this connection (its headers have arrived and its response is not done)."""
    return conn.cycle is not None and not conn.cycle.response_complete


def _has_unread_bytes(conn: H11Protocol) -> bool:
    """The client has sent bytes the server has not read yet. In a burst, asyncio makes every accepted connection
    before it reads any of them, so a connection whose whole request is waiting in the kernel still looks idle to
    `_busy`: evicting it dropped a complete request without an answer. A peek tells them apart."""
    sock = conn.transport.get_extra_info("socket")
    raw = getattr(sock, "_sock", sock)  # asyncio's TransportSocket wraps the socket
    try:
        return bool(raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))  # b"": the client closed its side
    except (OSError, AttributeError, ValueError):  # BlockingIOError (nothing sent) is an OSError
        return False


_REFUSED = (b'{"error": {"message": "server overloaded: too many open connections (--max-connections); retry '
            b'later", "type": "overloaded_error", "param": null, "code": 503}}')
_REFUSED_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: " + str(len(_REFUSED)).encode() + b"\r\n\r\n" + _REFUSED)


class LimitedH11Protocol(H11Protocol):
    """H11Protocol with the connection cap and the header deadline (class attributes set by limited_protocol)."""

    max_connections = 1024
    header_timeout_s = 10.0
    stats: dict[str, int] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened = time.monotonic()
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections and not self._make_room():
            self.stats["refused"] = self.stats.get("refused", 0) + 1
            transport.write(_REFUSED_RESPONSE)
            transport.close()
            return
        self._arm()

    def _make_room(self) -> bool:
        """Closes the oldest connection without a request in progress or waiting to be read; False if every other
        one has one."""
        idle = [c for c in self.connections if c is not self and not _busy(c) and not c.transport.is_closing()
                and not _has_unread_bytes(c)]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: getattr(c, "_opened", 0.0))
        self.stats["evicted"] = self.stats.get("evicted", 0) + 1
        oldest.transport.close()
        return True

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not _busy(self) and not self.transport.is_closing():
            self.stats["header_timeouts"] = self.stats.get("header_timeouts", 0) + 1
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if _busy(self):  # the headers are in: the request's own limits apply from here
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not _busy(self):  # keep-alive (not a pipelined request already
            self._arm()  # running): the next request's headers have the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def limited_protocol(max_connections: int, header_timeout_s: float) -> type[LimitedH11Protocol]:
    """A protocol class for uvicorn.Config(http=...) with these limits and its own counters (``stats``)."""
    if not header_timeout_s > 0:
        raise ValueError(f"--header-timeout {header_timeout_s} is invalid; accepted: seconds > 0")
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {
        "max_connections": max_connections, "header_timeout_s": float(header_timeout_s), "stats": {}})


class RateLimitedLog(logging.Filter):
    """Lets through at most `burst` records of one message (logger, level, format string) per `window_s`."""

    def __init__(self, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[tuple, list] = {}  # key -> [window start, passed in window, dropped since last passed]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            slot = self._seen.get(key)
            if slot is None or now - slot[0] >= self.window_s:
                dropped = slot[2] if slot else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 1000:  # bounded: forget the oldest windows
                    for k in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                        del self._seen[k]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this dropped in the last {self.window_s:g} s]"
                return True
            if slot[1] < self.burst:
                slot[1] += 1
                return True
            slot[2] += 1
            return False


def install_log_limits(burst: int = 5, window_s: float = 10.0) -> RateLimitedLog:
    """Puts one RateLimitedLog on each of the server's loggers (idempotent); returns it."""
    for name in SERVER_LOGGERS:
        for f in logging.getLogger(name).filters:
            if isinstance(f, RateLimitedLog):
                return f
    limiter = RateLimitedLog(burst, window_s)
    for name in SERVER_LOGGERS:
        logging.getLogger(name).addFilter(limiter)
    return limiter


def uvicorn_kwargs(max_connections: int | None = None, header_timeout_s: float = 10.0) -> dict[str, Any]:
    """What `prmkern serve` and serve_in_thread give uvicorn.Config: the limited protocol, the keep-alive idle
    timeout, and the log limits installed."""
    cap, soft = connection_limit(max_connections)
    install_log_limits()
    # asyncio accepts up to `backlog` sockets in one burst before any protocol runs (and can evict): the burst
    # plus the connections held must stay under the descriptor limit, else accept() meets EMFILE.
    backlog = max(1, min(2048, cap, soft - _FD_RESERVE - cap))
    return {"http": limited_protocol(cap, header_timeout_s), "timeout_keep_alive": 5, "backlog": backlog}

"""The driver side of tensor parallelism: starts the rank processes, sends them each step, watches them.

`TensorParallelExecutor` spawns one worker per rank (torch.multiprocessing, spawn) and talks to each over a pipe.
The caller's process is not a rank: it holds the scheduler, block manager and sampler (they run once, as in
nano-vllm and vLLM), prepares each step's inputs and metadata on the host, sends them to every rank, and reads the
logits back from rank 0. Keeping the caller out of the process group lets it also be a rank of a torchrun
data-parallel job (its default group), and lets one process hold several tensor-parallel LLM objects.

Failure handling: while waiting, the driver watches every rank's pipe and process sentinel. A rank that raises sends
its traceback; a rank that dies (killed, out of memory) closes its sentinel; either way the driver stops every rank
and raises `WorkerError` naming the rank within a poll interval, never waiting on a collective. A rank that hangs
is bounded by `step_timeout_s` (and the process group's own collective timeout).
"""
from __future__ import annotations

import socket
import time
import weakref
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp

from prmkern.engine.engine import FatalEngineError
from prmkern.config import EngineConfig
from prmkern.distributed.worker import recv, send, worker_main


# What the fork server imports once for every rank it will fork: the worker, and torch._dynamo, which building a
# model on the meta device imports lazily (~4 s on a loaded CPU, paid once here instead of once per rank).
PRELOAD = ["prmkern.distributed.worker", "torch._dynamo"]


class WorkerError(FatalEngineError):
    """A tensor-parallel rank failed (raised, died, or did not answer in time); every rank has been stopped."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs, conns) -> None:
    """Stops every rank: a polite 'stop', then terminate, then kill. Safe to call twice."""
    for conn in conns:
        try:
            send(conn, ("stop",))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for conn in conns:
        conn.close()
    procs.clear()
    conns.clear()


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig, world: int, *, step_timeout_s: float = 600.0,
                 start_timeout_s: float = 600.0):
        if config.device.type == "cuda" and torch.cuda.device_count() < (config.device.index or 0) + world:
            raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs from {config.device}; "
                             f"{torch.cuda.device_count()} are visible")
        self.world = world
        self.step_timeout_s = step_timeout_s
        self.error: str | None = None
        # forkserver: one clean server process (no threads, CUDA not initialised) imports torch and prmkern once;
        # each rank is forked from it, so starting ranks costs a fork, not an interpreter plus torch per rank.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        port = _free_port()
        threads = max(1, torch.get_num_threads() // world) if config.device.type == "cpu" else 1
        self.procs: list = []
        self.conns: list = []
        for rank in range(world):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=worker_main, name=f"prmkern-tp{rank}", daemon=True,
                            args=(rank, world, config, port, step_timeout_s, threads, child))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        # Stops the ranks when this object is collected or the interpreter exits, whichever comes first.
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        replies = self._wait_for(list(range(world)), "ready", start_timeout_s)
        self.capacity = min(replies.values())  # KV blocks that fit on every rank

    # -- waiting on ranks ----------------------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        self.error = message
        self.close()
        raise WorkerError(message)

    def _check_open(self) -> None:
        if self.error is not None:
            raise WorkerError(f"the tensor-parallel workers were stopped after an error; create a new LLM. "
                              f"The error was: {self.error}")
        if not self.procs:
            raise WorkerError("the tensor-parallel workers are shut down (LLM.close() was called)")

    def _wait_for(self, ranks: list[int], kind: str, timeout_s: float) -> dict[int, object]:
        """Waits for message `kind` from each of `ranks` while watching every rank; returns {rank: payload}."""
        deadline = time.monotonic() + timeout_s
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        conns = {id(c): r for r, c in enumerate(self.conns)}
        got: dict[int, object] = {}
        hint = ("; a script that creates a tensor-parallel LLM must do so under `if __name__ == '__main__':` "
                "(each rank imports the main script)") if kind == "ready" else ""
        while len(got) < len(ranks):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(ranks) - set(got))
                self._fail(f"tensor-parallel rank(s) {missing} sent no {kind!r} within {timeout_s:.0f} s")
            ready = wait(list(self.conns) + list(sentinels), timeout=min(left, 1.0))
            for obj in ready:
                if id(obj) not in conns:  # a sentinel: the rank's process ended
                    self._diagnose(hint)
                r = conns[id(obj)]
                try:
                    message = recv(obj)
                except (EOFError, OSError):
                    self._diagnose(hint)
                if message[0] == "error":
                    self._diagnose(hint, {r: (message[2], message[1])})
                if message[0] != kind or r not in ranks or r in got:
                    self._fail(f"tensor-parallel rank {r} sent {message[0]!r} while the driver waited for {kind!r}")
                got[r] = message[1]
        return got

    def _diagnose(self, hint: str, errors: dict[int, tuple[float, str]] | None = None, settle_s: float = 1.0):
        """Something failed: names the rank that failed first and raises WorkerError.

        One rank's failure makes the others fail in their next collective ("connection reset"), so the first report
        to arrive is not always the cause. For `settle_s` the other ranks' reports are collected; a rank that died
        without a report (killed, crashed) is the cause, else the earliest report by the ranks' clocks."""
        errors = dict(errors or {})
        open_ = {r for r in range(len(self.conns)) if r not in errors}
        closed: set[int] = set()  # ranks whose pipe ended without a report: they died
        deadline = time.monotonic() + settle_s
        while open_ and time.monotonic() < deadline:
            ready = wait([self.conns[r] for r in open_], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for conn in ready:
                r = self.conns.index(conn)
                try:
                    message = recv(conn)
                except (EOFError, OSError):
                    open_.discard(r)
                    closed.add(r)
                    continue
                if message[0] == "error":
                    errors[r] = (message[2], message[1])
                    open_.discard(r)
        # A dead rank's exit code comes from the fork server, which reaps it when it next runs: on a loaded machine
        # that can be later than the pipe's end, so a closed pipe alone names the rank; the code is waited for
        # briefly, only to report it.
        code_deadline = time.monotonic() + 2.0
        for r in sorted(closed - set(errors)):
            self.procs[r].join(max(0.0, code_deadline - time.monotonic()))
        for p in self.procs:
            p.is_alive()  # polls the process, setting exitcode if it has ended
        silent = [r for r, p in enumerate(self.procs) if (p.exitcode is not None or r in closed) and r not in errors]
        if silent:
            r = silent[0]
            code = self.procs[r].exitcode
            how = f"exited with code {code}" if code is not None else "closed its pipe without a report"
            message = f"tensor-parallel rank {r} {how} (killed or crashed){hint}"
        elif errors:
            r = min(errors, key=lambda i: errors[i][0])
            message = f"tensor-parallel rank {r} failed: {errors[r][1]}"
        else:
            message = "tensor-parallel ranks failed without a report"
        others = sorted(set(errors) - {r})
        if others:
            message += f"\n(rank(s) {others} failed after it, in a collective with the failed rank)"
        self._fail(message)

    def _broadcast(self, message: tuple) -> None:
        for conn in self.conns:
            try:
                send(conn, message)
            except (OSError, ValueError):  # a rank's end of the pipe is gone: find out which rank failed, and how
                self._diagnose("")

    # -- the driver's calls --------------------------------------------------------------------------------------
    def init_cache(self, num_blocks: int) -> None:
        self._check_open()
        self._broadcast(("init_cache", num_blocks))
        self._wait_for(list(range(self.world)), "ok", self.step_timeout_s)

    def execute(self, payload: tuple) -> torch.Tensor:
        """Runs one step on every rank; returns rank 0's float32 logits [num_sampling_rows, vocab] (CPU)."""
        self._check_open()
        self._broadcast(("step", payload))
        return self._wait_for([0], "logits", self.step_timeout_s)[0]

    def inject_fault(self, rank: int, after_steps: int = 1) -> None:
        """Test hook: rank `rank` raises at its `after_steps`-th next step."""
        self._check_open()
        send(self.conns[rank], ("fault", after_steps))

    def close(self) -> None:
        self._finalizer()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


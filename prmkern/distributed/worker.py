"""A tensor-parallel worker process: one rank's shard of the model, its share of the KV cache, and a step loop.

Started by `TensorParallelExecutor` (torch.multiprocessing spawn), one per rank. It joins the process group
(NCCL on CUDA, gloo on the CPU), loads its shard from the safetensors slices, reports how many KV blocks fit, and
then runs whatever steps the driver (the caller's process, where the scheduler and sampler live) sends over its
pipe. Every rank runs the same forward; the all-reduces inside the model keep them in lock step. Rank 0 returns
the logits of the sampling rows. Any exception is sent back to the driver with its traceback before the process
exits, so the caller raises it instead of waiting on a collective that will never complete.

Messages are pickled tuples (plain pickle: tensors are copied, not shared, which for a step's few kilobytes of
metadata is cheaper than a shared-memory handle per tensor).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from typing import Any

import torch

from prmkern.config import EngineConfig


def send(conn, message: tuple) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn) -> tuple:
    return pickle.loads(conn.recv_bytes())


def to_device(obj: Any, device: torch.device) -> Any:
    """Moves the tensors of a step payload (tensors, dataclasses of tensors, tuples, lists) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    return obj


def rank_device(device: torch.device, rank: int) -> torch.device:
    """CPU ranks share the CPU; CUDA rank r takes the r-th GPU after the one the caller named (cuda -> cuda:r)."""
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


class _Worker:
    def __init__(self, rank: int, world: int, config: EngineConfig, conn):
        from prmkern.distributed.sharding import load_shard
        from prmkern.engine.engine import CPU_KV_CACHE_BYTES
        from prmkern.engine.runner import kv_block_bytes

        self.rank, self.world, self.conn = rank, world, conn
        self.config = config
        self.model = load_shard(config.model, config.dtype, config.device, rank, world)
        cfg = config
        if cfg.num_kvcache_blocks is not None:
            capacity = cfg.num_kvcache_blocks
        else:
            budget = cfg.kv_cache_memory
            if budget is None:
                if cfg.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(cfg.device)
                    budget = int(free * 0.9)
                else:
                    budget = CPU_KV_CACHE_BYTES
            capacity = budget // kv_block_bytes(self.model, cfg.block_size, cfg.dtype)
        self.capacity = int(capacity)
        self.runner = None
        self.steps = 0
        self.fail_at: int | None = None  # test hook: raise at this step (see TensorParallelExecutor.inject_fault)

    def init_cache(self, num_blocks: int) -> None:
        from prmkern.engine.runner import ModelRunner
        # the driver owns the block manager; a worker only needs the caches, backend and GEMM dispatch
        self.runner = ModelRunner(self.config, self.model, num_blocks, None, None)

    @torch.inference_mode()
    def step(self, payload: tuple) -> torch.Tensor | None:
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self.steps}")
        from prmkern.models import ForwardContext

        copies, input_ids, positions, meta, rows, is_prefill = to_device(payload, self.config.device)
        runner = self.runner
        if copies:
            runner._copy_blocks(copies)
        if not is_prefill and runner.packed_gemm is not None:
            runner.packed_gemm.prepare(input_ids.shape[0])
        ctx = ForwardContext(runner.backend, meta, runner.kv_caches, self.model.cos_sin_cache)
        hidden = self.model(input_ids, positions, ctx)  # all-reduced inside: identical on every rank
        if self.rank != 0:
            return None
        return self.model.compute_logits(hidden if rows is None else hidden[rows]).cpu()


def _loopback_listener(rank: int, port: int) -> socket.socket | None:
    """Rank 0's rendezvous socket, bound to 127.0.0.1 only: TCPStore binds its own to every interface, and the ranks
    of a one-node run never need more than loopback (the store would otherwise take connections from the network)."""
    if rank != 0:
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def worker_main(rank: int, world: int, config: EngineConfig, port: int, timeout_s: float, threads: int,
                conn) -> None:
    """Entry point of a spawned rank. Exits on a 'stop' message, on the driver closing its pipe, or on an error."""
    import torch.distributed as dist

    try:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
        config = dataclasses.replace(config, device=rank_device(config.device, rank))
        if config.device.type == "cuda":
            torch.cuda.set_device(config.device)
        backend = "nccl" if config.device.type == "cuda" else "gloo"
        # An explicit store, not an init_method URL: under torchrun (a data-parallel rank hosting this engine) the
        # URL rendezvous would obey TORCHELASTIC_USE_AGENT_STORE and wait for a store nobody hosts.
        listener = _loopback_listener(rank, port)  # kept referenced: the store serves on its descriptor
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                              master_listen_fd=None if listener is None else listener.fileno())
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        worker = _Worker(rank, world, config, conn)
        send(conn, ("ready", worker.capacity))
        while True:
            try:
                message = recv(conn)
            except (EOFError, OSError):
                break  # the driver is gone
            kind = message[0]
            if kind == "step":
                logits = worker.step(message[1])
                if rank == 0:
                    send(conn, ("logits", logits))
            elif kind == "init_cache":
                worker.init_cache(message[1])
                send(conn, ("ok", None))
            elif kind == "fault":
                worker.fail_at = worker.steps + message[1]
            elif kind == "stop":
                os._exit(0)  # nothing to flush; a process-group teardown would only wait on the other ranks
            else:
                raise RuntimeError(f"unknown message {kind!r}")
    except BaseException as e:  # report everything (KeyboardInterrupt too), then exit
        try:
            send(conn, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.time()))
        except (OSError, ValueError):
            pass
        os._exit(1)  # do not wait on collectives or process-group teardown another rank will never join
    os._exit(0)

"""EngineConfig: every engine setting in one validated dataclass, passed explicitly (no global state)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    model: str
    dtype: torch.dtype
    device: torch.device
    block_size: int = 16
    num_kvcache_blocks: int | None = None  # explicit pool size; else derived from kv_cache_memory
    kv_cache_memory: int | None = None  # bytes for the KV pool (default: CPU 40% of MemAvailable, >= 1 GiB; CUDA 90% of free)
    # vLLM's meaning, CUDA only: the fraction of the device's total memory this process may fill; the KV pool gets
    # what is left of it after the weights (overrides the 90%-of-free default; kv_cache_memory wins over it).
    gpu_memory_utilization: float | None = None
    max_num_seqs: int = 256  # cap on running sequences
    max_num_batched_tokens: int = 4096  # per-step token budget (chunked prefill)
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    enable_prefix_caching: bool = True
    attention_backend: str | None = None  # None: "triton" on CUDA, "cpp" on the CPU when built, else "torch"
    seed: int = 0
    # vLLM's name: True runs decode steps eagerly; False (default) replays them from CUDA graphs where they can be
    # captured (CUDA device, Triton backend; prmkern/engine/cuda_graphs.py).
    enforce_eager: bool = False
    max_graph_batch: int = 256  # largest decode batch that is captured; larger batches run eagerly
    # CPU: memory for packed copies of the weights; 0 disables. Default 1 GiB. With the cpp backend, column-panel
    # copies for the C++ GEMMs (prmkern/models/decode_panels.py; the size of the weights packed, projection by
    # projection while it lasts); with the torch backend in fp32, MKL-packed copies for decode GEMMs
    # (prmkern/models/packed_gemm.py; one copy per decode row bucket, ~1.4x the weights each).
    packed_gemm_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, accepted: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; accepted: {accepted}")

        check(isinstance(self.block_size, int) and self.block_size >= 1, "block_size", "an int >= 1 (default 16)")
        check(self.num_kvcache_blocks is None or (isinstance(self.num_kvcache_blocks, int) and
                                                  self.num_kvcache_blocks >= 1),
              "num_kvcache_blocks", "None or an int >= 1")
        check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "None or bytes > 0")
        check(self.gpu_memory_utilization is None or
              (isinstance(self.gpu_memory_utilization, (int, float)) and not isinstance(self.gpu_memory_utilization,
                                                                                       bool)
               and 0 < self.gpu_memory_utilization <= 1), "gpu_memory_utilization", "None or a float in (0, 1]")
        check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs", "an int >= 1")
        check(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
              "max_num_batched_tokens", "an int >= 1")
        check(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 1),
              "max_model_len", "None or an int >= 1")
        check(isinstance(self.enforce_eager, bool), "enforce_eager", "True or False")
        check(isinstance(self.max_graph_batch, int) and self.max_graph_batch >= 1, "max_graph_batch", "an int >= 1")
        check(isinstance(self.packed_gemm_bytes, int) and self.packed_gemm_bytes >= 0, "packed_gemm_bytes",
              "an int >= 0 (bytes; 0 disables)")
        if self.attention_backend is None:
            from prmkern.attention.backend import default_backend
            self.attention_backend = default_backend(self.device)

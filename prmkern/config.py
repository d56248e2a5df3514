"""EngineConfig: every engine setting in one validated dataclass, passed explicitly (no global state).

It is also the one source of the engine's defaults and option help: `LLM`'s signature takes its defaults from
here and the command line (prmkern/cli/options.py) derives one flag per field from `fields(EngineConfig)`, its
type, default and `metadata["help"]`. It does not load anything; `attention_backend=None` is resolved to the
device's default backend.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from prmkern.attention.backend import backend_class, backend_names, default_backend


class EngineConfigError(ValueError):
    """A field outside what it accepts. The message names the field (`block_size=0 is invalid; accepted: ...`);
    `field`, `value` and `accepted` let a caller name its own spelling of it (the CLI names the flag)."""

    def __init__(self, name: str, value: object, accepted: str):
        super().__init__(f"{name}={value!r} is invalid; accepted: {accepted}")
        self.field, self.value, self.accepted = name, value, accepted


def _opt(default, help: str, **meta):
    """A field with its default and the help the command line shows (plus `size`: parsed as bytes, 'GiB')."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class EngineConfig:
    model: str = field(metadata={"help": "Hugging Face checkpoint directory (default: the shipped verifier for "
                                         "verify/eval/bon/serve, the random-weight model for generate/demo)"})
    dtype: torch.dtype = field(metadata={"help": "float32 | bfloat16 | float16 (default auto: the checkpoint's)"})
    device: torch.device = field(metadata={"help": "cpu | cuda | cuda:N (default: cuda when available)"})
    block_size: int = _opt(16, "tokens per KV-cache block")
    num_kvcache_blocks: int | None = _opt(None, "KV pool size in blocks (overrides --kv-cache-memory)")
    kv_cache_memory: int | None = _opt(
        None, "bytes for the KV cache, e.g. 4GiB (default: 40% of available memory, at least 1 GiB, on the CPU, "
              "allocated untouched; 90% of free memory on CUDA)", size=True)
    # vLLM's meaning, CUDA only: the fraction of the device's total memory this process may fill; the KV pool gets
    # what is left of it after the weights (overrides the 90%-of-free default; kv_cache_memory wins over it).
    gpu_memory_utilization: float | None = _opt(
        None, "CUDA: the fraction of the GPU's memory this process may fill, the KV pool taking what the weights "
              "leave (vLLM's meaning; ignored with a warning on the CPU)")
    max_num_seqs: int = _opt(256, "chains running at once")
    max_num_batched_tokens: int = _opt(4096, "tokens per engine step (chunked prefill)")
    max_model_len: int | None = _opt(None, "longest prompt + generation in tokens (default: the model's "
                                           "max_position_embeddings)")
    enable_prefix_caching: bool = _opt(True, "share the KV of equal prompt prefixes between requests")
    attention_backend: str | None = _opt(None, "attention backend (default: triton on CUDA, cpp on the CPU when "
                                               "built, else torch)")
    seed: int = _opt(0, "engine seed (requests without their own seed draw from it)")
    # vLLM's name: True runs decode steps eagerly; False (default) replays them from CUDA graphs where they can be
    # captured (CUDA device, Triton backend; prmkern/engine/cuda_graphs.py).
    enforce_eager: bool = _opt(False, "no CUDA graphs for decode steps")
    max_graph_batch: int = _opt(256, "largest decode batch captured in a CUDA graph; larger ones run eagerly")
    # CPU: memory for packed copies of the weights; 0 disables. Default 1 GiB. With the cpp backend, column-panel
    # copies for the C++ GEMMs (prmkern/models/decode_panels.py; the size of the weights packed, projection by
    # projection while it lasts); with the torch backend in fp32, MKL-packed copies for decode GEMMs
    # (prmkern/models/packed_gemm.py; one copy per decode row bucket, ~1.4x the weights each).
    packed_gemm_bytes: int = _opt(1 << 30, "CPU: bytes for packed copies of the weights (0 disables)", size=True,
                                  zero=True)

    def __post_init__(self) -> None:
        check_values(self)
        self.seed = 0 if self.seed is None else int(self.seed)  # numpy ints too: random.Random takes int only
        if self.attention_backend is None:
            self.attention_backend = default_backend(self.device)
        why = backend_class(self.attention_backend).unavailable_on(self.device)
        if why is not None:  # found here, not by every request's first step after the model loaded
            raise EngineConfigError("attention_backend", self.attention_backend,
                                    f"a backend that runs on {self.device}: {why}")


def check_values(c) -> None:
    """The checks of every field that has a rule; `c` is an EngineConfig or anything with its field names (the
    command line checks its options with this before a model loads). Raises EngineConfigError."""
    def check(ok: bool, name: str, accepted: str) -> None:
        if not ok:
            raise EngineConfigError(name, getattr(c, name), accepted)

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    check(is_int(c.block_size) and c.block_size >= 1, "block_size", "an int >= 1 (default 16)")
    check(c.num_kvcache_blocks is None or (is_int(c.num_kvcache_blocks) and c.num_kvcache_blocks >= 1),
          "num_kvcache_blocks", "None or an int >= 1")
    check(c.kv_cache_memory is None or (is_int(c.kv_cache_memory) and c.kv_cache_memory > 0), "kv_cache_memory",
          "None or bytes > 0 (an int)")
    check(c.gpu_memory_utilization is None or
          (isinstance(c.gpu_memory_utilization, (int, float)) and not isinstance(c.gpu_memory_utilization, bool)
           and 0 < c.gpu_memory_utilization <= 1), "gpu_memory_utilization", "None or a float in (0, 1]")
    check(is_int(c.max_num_seqs) and c.max_num_seqs >= 1, "max_num_seqs", "an int >= 1")
    check(is_int(c.max_num_batched_tokens) and c.max_num_batched_tokens >= 1, "max_num_batched_tokens",
          "an int >= 1")
    check(c.max_model_len is None or (is_int(c.max_model_len) and c.max_model_len >= 1), "max_model_len",
          "None or an int >= 1")
    check(isinstance(c.enable_prefix_caching, bool), "enable_prefix_caching", "True or False")
    check(c.seed is None or (isinstance(c.seed, numbers.Integral) and not isinstance(c.seed, bool)), "seed",
          "an int or None (None: 0)")
    check(c.attention_backend is None or c.attention_backend in backend_names(), "attention_backend",
          f"None (the device's default) or one of {', '.join(backend_names())}")
    check(isinstance(c.enforce_eager, bool), "enforce_eager", "True or False")
    check(is_int(c.max_graph_batch) and c.max_graph_batch >= 1, "max_graph_batch", "an int >= 1")
    check(is_int(c.packed_gemm_bytes) and c.packed_gemm_bytes >= 0, "packed_gemm_bytes",
          "an int >= 0 (bytes; 0 disables)")

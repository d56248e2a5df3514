"""The attention backend seam: the operations a model's forward pass needs that a backend may implement in kernels.

Backends are registered by name in `BACKENDS` and chosen by `EngineConfig.attention_backend`. Every backend passes
the same tests; `torch` is the reference, `cpp` (C++ kernels, csrc/) the CPU default when built, `triton` the fast path on CUDA.
A backend takes plain tensors and the metadata of `metadata.py`; it knows nothing of sequences or scheduling.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from prmkern.attention.metadata import DecodeMetadata, PrefillMetadata
from prmkern.ops.cpp import cpp_ops


class AttentionBackend(ABC):
    name: str = "abstract"
    # What a backend offers, declared here rather than compared by name by its users:
    uninitialized_kv_ok: bool = False  # reads only KV slots written before (a CPU pool may be left unzeroed)
    cuda_graphs: bool = False  # its decode steps can be captured in CUDA graphs (prmkern/engine/cuda_graphs.py)
    cpu_kernels: bool = False  # runs prmkern's C++ CPU kernels, which the model and the sampler may use too

    @classmethod
    def unavailable_on(cls, device: torch.device) -> str | None:
        """Why this backend cannot run on `device`, or None when it can: asked before a model loads (EngineConfig),
        so a backend that would fail every request's first step fails the configuration instead."""
        return None

    @abstractmethod
    def store_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, all_valid: bool = False) -> None:
        """Write key/value [num_tokens, num_kv_heads, head_dim] into the caches at `slot_mapping` (-1 = skip).
        all_valid: the caller knows no slot is -1 (every decode step), so a backend may skip the check."""

    @abstractmethod
    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PrefillMetadata,
                scale: float) -> torch.Tensor:
        """Causal attention of new tokens q [num_tokens, num_heads, head_dim] over their cached prefix + themselves."""

    @abstractmethod
    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
               scale: float) -> torch.Tensor:
        """Attention of one token per sequence q [batch, num_heads, head_dim] over its paged KV."""

    # Elementwise layers. Backends with fused kernels override these; the torch versions are the reference.
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RMSNorm of `x + residual` (when given); returns (normed, x + residual) like vLLM's fused add-norm."""
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            # one fused op; in float32 the same arithmetic as the formula below (HF's), bit for bit on the CPU
            return F.rms_norm(x, weight.shape, weight, eps), residual
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (normed.to(x.dtype) * weight), residual

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary embedding. q [T, Hq, D], k [T, Hkv, D]; cos_sin_cache [max_pos, D] float32 = [cos | sin]
        over the D/2 frequencies. Returns rotated (q, k) (backends may rotate in place).

        q and k are rotated together ([T, Hq + Hkv, D]) and the step's cos/sin rows are gathered once for all
        layers (every layer passes the same `positions` tensor): on the CPU a decode step's cost is its op count."""
        half = q.shape[-1] // 2
        cached = self._rope_rows
        if cached is not None and cached[0] is positions and cached[1] is cos_sin_cache:
            cos, sin = cached[2], cached[3]
        else:
            cs = cos_sin_cache[positions]  # [T, D]
            cos, sin = cs[:, None, :half], cs[:, None, half:]  # [T, 1, D/2]
            self._rope_rows = (positions, cos_sin_cache, cos, sin)
        x = torch.cat((q, k), dim=1).float()  # [T, Hq + Hkv, D]
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(q.dtype)
        return out[:, :q.shape[1]], out[:, q.shape[1]:]

    _rope_rows: tuple | None = None  # (positions, cache, cos, sin) of the last step, held so identity is safe

    def rotary_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, all_valid: bool = False) -> torch.Tensor:
        """`apply_rotary` to q [T, Hq, D] and k [T, Hkv, D], then `store_kv` of the rotated k and v; returns the
        rotated q. One seam for the pair, so that a backend may fuse them into one pass (the C++ backend does)."""
        q, k = self.apply_rotary(q, k, positions, cos_sin_cache)
        self.store_kv(k, v, k_cache, v_cache, slot_mapping, all_valid)
        return q

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2 * I] = [gate | up] -> silu(gate) * up [T, I]."""
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up


BACKENDS: dict[str, type[AttentionBackend]] = {}


def default_backend(device: torch.device) -> str:
    """The backend a device gets by default: "triton" on CUDA; on the CPU "cpp" (prmkern's C++ kernels) when they
    are built, else "torch" (after a one-line notice)."""
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and cpp_ops() is not None:
        return "cpp"
    return "torch"


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    BACKENDS[cls.name] = cls
    return cls


def _import_backends() -> None:
    """Imports the implementations, which register themselves, so that the registry does not depend on what else
    was imported (triton's is skipped where triton is not installed)."""
    from prmkern.attention import cpp_backend, torch_backend  # noqa: F401
    try:
        from prmkern.attention import triton_backend  # noqa: F401
    except ImportError:
        pass


def backend_names() -> list[str]:
    """The names of the registered backends (what `EngineConfig.attention_backend` and `--attention-backend`
    accept)."""
    _import_backends()
    return sorted(BACKENDS)


def backend_class(name: str) -> type[AttentionBackend]:
    """The registered class of `name` (its capabilities, without making one)."""
    _import_backends()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]


def get_backend(name: str) -> AttentionBackend:
    return backend_class(name)()

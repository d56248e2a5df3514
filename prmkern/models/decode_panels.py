"""Column-panel copies of the decode weights, for the C++ panel GEMM (csrc/panel_gemm.cpp).

A checkpoint stores a projection as w [N, K] (output-major). Decode multiplies a few activation rows by it, and the
C++ GEMM on that layout takes dot products (csrc/decode_gemm.cpp). The panel layout [ceil(N/48), K, 48] puts 48
outputs' weights for one k side by side, so the GEMM broadcasts each activation and needs no per-output
reduction: 1.1-1.5x on most decode shapes measured, 0.87-1.05x on the 39M model's 512 x 1408 down projection, and
ahead of MKL at prefill sizes, so a projection with panels runs every GEMM on them (docs/cpu_kernels.md). The
checkpoint's tensor stays (the torch path, tensor-parallel sharding and anything reading the module's weight use
it), so a panel copy is memory on top of the weights. It is made under the runner's
`packed_gemm_bytes` budget (the same knob as the torch backend's MKL-packed copies), in module order, each
projection that still fits; a projection without a copy keeps the output-major GEMM.

Panels are made on CPUs that run the AVX-512 path, for fp32, fp16 and bf16 weights. On a CPU with AVX-512 BF16, bf16 weights are packed in pair
panels [ceil(N/48), ceil(K/2), 48, 2] instead (two k side by side per output), the layout `vdpbf16ps` multiplies
against a broadcast pair of bf16 activations: two products per float32 lane per instruction. A weight changed after
packing (an in-place update bumps its version counter; a replaced Parameter is another object) is re-packed on its
next call, so a panel copy is never stale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PANEL_COLS = 48  # csrc/panel_gemm.h kPanelCols


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> panels [ceil(N/48), K, 48] (contiguous, w's dtype): panels[p, k, c] = w[48 p + c, k], zero past
    N."""
    if weight.dim() != 2:
        raise ValueError(f"pack_panels takes a 2-D weight [N, K]; got shape {tuple(weight.shape)}")
    n, k = weight.shape
    p = -(-n // PANEL_COLS)
    padded = F.pad(weight.detach(), (0, 0, 0, p * PANEL_COLS - n))  # [p * 48, K]
    return padded.view(p, PANEL_COLS, k).transpose(1, 2).contiguous()


def pack_pair_panels(weight: torch.Tensor) -> torch.Tensor:
    """bf16 w [N, K] -> pair panels [ceil(N/48), ceil(K/2), 48, 2]: panels[p, kk, c, j] = w[48 p + c, 2 kk + j], zero
    past N and past K."""
    if weight.dim() != 2 or weight.dtype != torch.bfloat16:
        raise ValueError(f"pack_pair_panels takes a 2-D bf16 weight [N, K]; got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    p, k2 = -(-n // PANEL_COLS), -(-k // 2)
    padded = F.pad(weight.detach(), (0, 2 * k2 - k, 0, p * PANEL_COLS - n))  # [p * 48, 2 * k2]
    return padded.view(p, PANEL_COLS, k2, 2).permute(0, 2, 1, 3).contiguous()


def panel_bytes(weight: torch.Tensor, pairs: bool = False) -> int:
    """Bytes of the panel copy of `weight` (pairs: the pair panels, K rounded up to even)."""
    n, k = weight.shape
    return -(-n // PANEL_COLS) * PANEL_COLS * (k + k % 2 if pairs else k) * weight.element_size()


def wants_panels(weight: torch.Tensor) -> bool:
    """Whether the panel GEMMs take this weight: a 2-D CPU weight of fp32, bf16 or fp16."""
    return (weight.dim() == 2 and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16, torch.float16))


class PanelCopy:
    """A weight's panel copy (pair panels for bf16 on an AVX-512 BF16 CPU) and what it was made from (the weight
    object and its version counter)."""

    __slots__ = ("panels", "source", "version", "pairs")

    def __init__(self, weight: torch.Tensor, bf16_dot: bool):
        self.pairs = bf16_dot and weight.dtype == torch.bfloat16
        self._pack(weight)

    def _pack(self, weight: torch.Tensor) -> None:
        self.panels = pack_pair_panels(weight) if self.pairs else pack_panels(weight)
        self.source, self.version = weight, weight._version

    def current(self, weight: torch.Tensor) -> torch.Tensor:
        """The panels of `weight`, re-packed first when the weight changed since they were made."""
        if weight is not self.source or weight._version != self.version:
            if self.pairs and weight.dtype != torch.bfloat16:
                self.pairs = False
            self._pack(weight)
        return self.panels


def attach_panels(linears: list, max_bytes: int, bf16_dot: bool, isa: str = "avx512") -> int:
    """Gives each `Linear` in `linears` (module order) a panel copy while `max_bytes` lasts (pair panels for bf16
    weights when `bf16_dot`: the CPU has AVX-512 BF16); returns the bytes used. Only on the AVX-512 path (`isa`,
    `prmkern._C.cpu_isa()`): on the AVX2 path the panel tiles (3 x 4 accumulators in 16 registers) ran at 0.88-0.97x
    of the output-major GEMM and below MKL at prefill sizes (measured on Zen 4 with PRMKERN_ISA=avx2), so AVX2 and
    portable CPUs get no copies."""
    used = 0
    for m in linears:
        m.panel_copy = None
        if isa != "avx512" or not wants_panels(m.weight):
            continue
        size = panel_bytes(m.weight, pairs=bf16_dot and m.weight.dtype == torch.bfloat16)
        if used + size > max_bytes:
            continue
        with torch.no_grad():
            m.panel_copy = PanelCopy(m.weight, bf16_dot)
        used += size
    return used

"""Column-panel copies of the decode weights, for the C++ panel GEMM (csrc/panel_gemm.cpp).

A checkpoint stores a projection as w [N, K] (output-major). Decode multiplies a few activation rows by it, and the
C++ GEMM on that layout takes dot products (csrc/decode_gemm.cpp). The panel layout [ceil(N/48), K, 48] puts 48
outputs' weights for one k side by side, so the GEMM broadcasts each activation and needs no per-output
reduction: 1.1-1.5x on the decode shapes measured (docs/cpu_kernels.md). Prefill (hundreds of rows, MKL) keeps
reading the checkpoint's tensor, so a panel copy is memory on top of the weights. It is made under the runner's
`packed_gemm_bytes` budget (the same knob as the torch backend's MKL-packed copies), layer by layer in module
order until the budget is spent; a projection without a copy keeps the output-major GEMM.

Panels are made for fp32 and fp16 weights, and for bf16 weights only where the CPU lacks AVX-512 BF16 (there the
bf16 x bf16 dot-product GEMM reads half the bytes per product and is kept). A weight changed after packing (an
in-place update bumps its version counter; a replaced Parameter is another object) is re-packed on its next call,
so a panel copy is never stale.
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


def panel_bytes(weight: torch.Tensor) -> int:
    n, k = weight.shape
    return -(-n // PANEL_COLS) * PANEL_COLS * k * weight.element_size()


def wants_panels(weight: torch.Tensor, bf16_dot: bool) -> bool:
    """Whether the panel GEMM serves this weight better than the output-major one: a 2-D CPU weight of fp32 or fp16
    (or bf16 on a CPU without AVX-512 BF16)."""
    return (weight.dim() == 2 and weight.device.type == "cpu"
            and (weight.dtype in (torch.float32, torch.float16) or (weight.dtype == torch.bfloat16 and not bf16_dot)))


class PanelCopy:
    """A weight's panel copy and what it was made from (the weight object and its version counter)."""

    __slots__ = ("panels", "source", "version")

    def __init__(self, weight: torch.Tensor):
        self.panels = pack_panels(weight)
        self.source = weight
        self.version = weight._version

    def current(self, weight: torch.Tensor) -> torch.Tensor:
        """The panels of `weight`, re-packed first when the weight changed since they were made."""
        if weight is not self.source or weight._version != self.version:
            self.panels = pack_panels(weight)
            self.source, self.version = weight, weight._version
        return self.panels


def attach_panels(linears: list, max_bytes: int, bf16_dot: bool) -> int:
    """Gives each `Linear` in `linears` (module order) a panel copy while `max_bytes` lasts; returns bytes used."""
    used = 0
    for m in linears:
        m.panel_copy = None
        if not wants_panels(m.weight, bf16_dot):
            continue
        size = panel_bytes(m.weight)
        if used + size > max_bytes:
            continue
        with torch.no_grad():
            m.panel_copy = PanelCopy(m.weight)
        used += size
    return used

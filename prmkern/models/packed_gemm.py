"""Decode GEMMs on the CPU: prmkern's C++ weight-streaming GEMM when built, else MKL's packed sgemm.

With the "cpp" backend (prmkern/engine/runner.py sets `Linear.cpp`), a Linear with a column-panel copy of its weight
(`Linear.panel_copy`, prmkern/models/decode_panels.py) runs every GEMM on it in C++, prefill included; one without
runs every CPU GEMM of up to `CPP_MAX_ROWS` rows (decode) in C++, in fp32, bf16 and fp16 alike, against the
checkpoint's output-major weight [out, in]: each weight byte is read once per step. Measured here (AMD EPYC, 2
threads, fp32, 16 rows, alternating): 2816 x 512 0.27 ms against MKL-packed 0.44 ms; the 32000 x 512 LM head 15.7
ms against 31.3 ms. So the runner makes no PackedGemm then; larger products without panels run F.linear. With the
torch backend, fp32 decode GEMMs take MKL's packed path below:

A decode step multiplies a few rows (one per running chain) by every projection weight. MKL's ordinary sgemm
re-packs the weight into its blocked layout on every call, so at a few rows it reads the weight twice and writes
it once; the packed API reorders the weight once (`aten::_mkl_reorder_linear_weight`) and each call then streams
the packed copy (`aten::_mkl_linear`). Measured here (2 threads, fp32, 16 rows): the 32000 x 512 LM head 2.9 ms
packed against 4.2-5.3 ms k-major and 6.8 ms row-major; the 2816 x 512 gate/up 0.20 against 0.26 ms.

A packed copy serves exactly one row count, so rows are bucketed to multiples of 8 (`bucket_rows`) and padded with
zero rows up to the bucket; a chain finishing does not cost a repack. Packs are made on the first decode step of a
bucket, the `max_buckets` most recently used are kept, and nothing is packed when one bucket's copy would exceed
`max_bytes` (a packed copy is ~1.36x the weights). fp32 on the CPU with MKL only; anything else runs F.linear.

It does not: pack for prefill (hundreds of rows: the ordinary GEMM is already efficient), or change any value
(the packed kernel sums in the same order; parity tests run through it).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from prmkern.models.prefill_gemm import use_cpp_prefill, wants_widening, widened_linear
from prmkern.ops.cpp import CPP_MAX_ROWS

BUCKET = 8  # rows per bucket step
MIN_ROWS = 4  # below this a decode GEMM is a matrix-vector product: packing does not pay
MAX_ROWS = 256


def bucket_rows(rows: int) -> int | None:
    """The packed row count that serves `rows` input rows, or None (too few or too many to pack for)."""
    if rows < MIN_ROWS or rows > MAX_ROWS:
        return None
    return -(-rows // BUCKET) * BUCKET


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class Linear(nn.Linear):
    """nn.Linear that uses a packed copy of its weight when `packed` holds one for the input's row bucket."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed: dict[int, torch.Tensor] = {}  # bucket rows -> MKL-packed weight (not in the state dict)
        self.cpp = None  # the C++ kernels module when the model runs on them (`use_cpu_kernels`), else None
        self.panel_copy = None  # the weight in column panels for the C++ panel GEMM (models/decode_panels.py)

    def decode_panels(self) -> torch.Tensor | None:
        """This weight's column panels (re-packed if the weight changed since), or None (no copy: the output-major
        C++ GEMM)."""
        return self.panel_copy.current(self.weight) if self.panel_copy is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpp is not None and x.dim() == 2 and self.weight.stride(1) == 1:
            panels = self.decode_panels()
            # The panel GEMM leads MKL at prefill sizes too (docs/cpu_kernels.md); the output-major one only up to
            # CPP_MAX_ROWS.
            if panels is not None or x.shape[0] <= CPP_MAX_ROWS:
                return self.cpp.decode_linear(x, self.weight, self.bias, panels)
            if use_cpp_prefill(self.cpp, x, self.weight):  # AVX2 CPUs (models/prefill_gemm.py)
                return self.cpp.prefill_linear(x, self.weight, self.bias)
        if wants_widening(x, self.weight):  # bf16 prefill on a CPU without native bf16 (models/prefill_gemm.py)
            return widened_linear(x, self.weight, self.bias)
        if self.packed and x.dim() == 2:
            rows = x.shape[0]
            bucket = bucket_rows(rows)
            packed = self.packed.get(bucket) if bucket is not None else None
            if packed is not None:
                if bucket != rows:  # zero rows up to the bucket; their outputs are dropped
                    x = F.pad(x, (0, 0, 0, bucket - rows))
                out = torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, bucket)
                return out[:rows] if bucket != rows else out
        return F.linear(x, self.weight, self.bias)


class PackedGemm:
    """Owns the packed copies of a model's `Linear` weights, per row bucket, under a memory budget."""

    def __init__(self, model: nn.Module, max_bytes: int, max_buckets: int = 2):
        self.linears = [m for m in model.modules() if isinstance(m, Linear)]
        self.max_bytes = max_bytes
        self.max_buckets = max_buckets
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in self.linears)
        self.bucket_bytes = int(1.4 * weight_bytes)  # estimate of one bucket's packed copy
        self.enabled = bool(self.linears) and mkl_packing_available() and all(
            m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" for m in self.linears)
        self.buckets: OrderedDict[int, None] = OrderedDict()  # LRU of packed buckets
        self.packs_made = 0

    def prepare(self, rows: int) -> None:
        """Before a decode step of `rows` rows: make sure its bucket is packed (or leave the step unpacked)."""
        bucket = bucket_rows(rows)
        if not self.enabled or bucket is None:
            return
        if bucket in self.buckets:
            self.buckets.move_to_end(bucket)
            return
        keep = min(self.max_buckets, self.max_bytes // max(self.bucket_bytes, 1))
        if keep < 1:
            return
        while len(self.buckets) >= keep:
            old, _ = self.buckets.popitem(last=False)
            for m in self.linears:
                m.packed.pop(old, None)
        with torch.inference_mode():
            for m in self.linears:
                m.packed[bucket] = torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), bucket)
        self.buckets[bucket] = None
        self.packs_made += 1

    def release(self) -> None:
        for m in self.linears:
            m.packed.clear()
        self.buckets.clear()

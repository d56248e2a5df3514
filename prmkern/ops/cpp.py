"""The operations of prmkern's C++ CPU kernels (csrc/, `prmkern._C`), as attention, the models and the sampler
use them: `cpp_ops()` is the loaded module (extension.py finds or builds it) or None, and the constants that
decide when a kernel is worth calling live here, beside it, so that no user of the kernels imports another for one.

The module's operations (csrc/binding.cpp): add_rms_norm, silu_and_mul, rotary_store_kv, prefill_attention,
cascade_decode (attention/cpp_backend.py); decode_linear on the weights or their column panels and
decode_layer (models/packed_gemm.py, models/fused_layer.py); sample_rows, the sampler's draw
(engine/sampler.py); cpu_isa and bf16_dot (what the CPU offers). Nothing here chooses a kernel for a tensor: the
callers check what a kernel takes and fall back to torch.
"""
from __future__ import annotations

from types import ModuleType

from prmkern.ops import extension

# Up to this many rows a GEMM streams the weight in C++; above, F.linear (MKL / oneDNN) wins (measurements:
# docs/cpu_kernels.md). Also the most rows the one-call decode layer takes.
CPP_MAX_ROWS = 128


def cpp_ops() -> ModuleType | None:
    """The C++ kernels module, or None (with a one-line notice on stderr the first time) when it cannot load;
    PRMKERN_DISABLE_CPP=1 disables it, for A/B runs (prmkern/ops/extension.py)."""
    return extension.load()

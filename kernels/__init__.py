"""Triton kernels for prmkern, one per file, each with its public launcher (installed as `prmkern.kernels`).

Launchers take plain tensors and ints, keyword arguments only, and check shapes, dtypes, devices and strides.
Nothing here imports prmkern: the kernels know nothing of the engine (see prmkern/attention/triton_backend.py for
the seam that calls them). Note: the package attributes below are the launcher functions, which shadow the
submodules of the same name; import a submodule's other names with `from kernels.paged_decode import ...`.
"""
from .cascade_decode import cascade_decode
from .merge_states import merge_states, reduce_states
from .paged_decode import paged_decode
from .paged_prefill import paged_prefill
from .rms_norm import rms_norm
from .rotary import rotary
from .shared_prefix_decode import shared_prefix_decode
from .silu_and_mul import silu_and_mul
from .store_kv import store_kv


def interpreted() -> bool:
    """True when these kernels were decorated under TRITON_INTERPRET=1 (they run on CPU tensors, through numpy);
    False when they compile for a GPU. Fixed at import: the env var must be set before triton is imported."""
    from triton.runtime.interpreter import InterpretedFunction

    from .paged_decode import _paged_decode_kernel
    return isinstance(_paged_decode_kernel, InterpretedFunction)


__all__ = ["cascade_decode", "interpreted", "merge_states", "paged_decode", "paged_prefill", "reduce_states",
           "rms_norm", "rotary", "shared_prefix_decode", "silu_and_mul", "store_kv"]

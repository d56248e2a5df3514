"""Triton kernels for prmkern, one per file, each with its public launcher: the package `prmkern.kernels`.

The kernel files live in the checkout's top-level `kernels/` folder, which has no `__init__.py` on purpose: a folder
with one would be importable as a top-level package named `kernels` whenever the checkout's root is on `sys.path`
(`python -m`, pytest, pip building from the root), and would shadow the PyPI package `kernels` that transformers
>= 5.25 imports. This file is the package's only `__init__`:
- in a source checkout or an editable install, `__path__` below adds the top-level `kernels/` folder;
- in a wheel, setup.py's build step copies the kernel files next to this file.

Launchers take plain tensors and ints, keyword arguments only, and check shapes, dtypes, devices and strides.
Nothing in the kernel files imports prmkern: the kernels know nothing of the engine (see
prmkern/attention/triton_backend.py for the seam that calls them). The package attributes below are the launcher
functions, which shadow the submodules of the same name; import a submodule's other names with
`from prmkern.kernels.paged_decode import ...`. Importing this package needs triton (the `triton` extra).
"""
from pathlib import Path as _Path

_CHECKOUT_KERNELS = _Path(__file__).resolve().parents[2] / "kernels"
if (_CHECKOUT_KERNELS / "paged_decode.py").is_file() and not (_Path(__file__).parent / "paged_decode.py").is_file():
    __path__.append(str(_CHECKOUT_KERNELS))  # noqa: F821 (a package's __path__ is defined by the import system)

from .cascade_decode import cascade_decode  # noqa: E402
from .merge_states import merge_states, reduce_states  # noqa: E402
from .paged_decode import paged_decode  # noqa: E402
from .paged_prefill import paged_prefill  # noqa: E402
from .rms_norm import rms_norm  # noqa: E402
from .rotary import rotary  # noqa: E402
from .shared_prefix_decode import shared_prefix_decode  # noqa: E402
from .silu_and_mul import silu_and_mul  # noqa: E402
from .store_kv import store_kv  # noqa: E402


def interpreted() -> bool:
    """True when these kernels were decorated under TRITON_INTERPRET=1 (they run on CPU tensors, through numpy);
    False when they compile for a GPU. Fixed at import: the env var must be set before triton is imported."""
    from triton.runtime.interpreter import InterpretedFunction

    from .paged_decode import _paged_decode_kernel
    return isinstance(_paged_decode_kernel, InterpretedFunction)


__all__ = ["cascade_decode", "interpreted", "merge_states", "paged_decode", "paged_prefill", "reduce_states",
           "rms_norm", "rotary", "shared_prefix_decode", "silu_and_mul", "store_kv"]

"""silu_and_mul against float64, several widths (one and several column tiles), NaN-poisoned output."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import DEVICE, assert_close, dtype_params, nan_like

from prmkern.kernels import silu_and_mul


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", [(7, 2 * 33), (2, 3, 2 * 64), (3, 2 * 1100)])
def test_silu_and_mul_matches_reference(dtype, shape):
    x = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype).to(DEVICE)
    out = nan_like(shape[:-1] + (shape[-1] // 2,), dtype)
    got = silu_and_mul(x=x, out=out)
    assert got is out
    gate, up = x.double().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    assert_close(out, expected, dtype, "silu_and_mul", scale=4.0)  # |out| up to ~20: two roundings


def test_silu_and_mul_allocates_in_input_dtype():
    x = torch.randn(2, 10, device=DEVICE).half()
    out = silu_and_mul(x=x)
    assert out.shape == (2, 5) and out.dtype == torch.float16
    assert_close(out, torch.nn.functional.silu(x[:, :5].double()) * x[:, 5:].double(), torch.float16, "alloc",
                 scale=4.0)

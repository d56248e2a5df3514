"""rms_norm (with and without the fused residual add) against a float64 reference and against the seam's torch
reference method (AttentionBackend.rms_norm semantics), odd hidden sizes, NaN-poisoned outputs."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import DEVICE, assert_close, dtype_params, nan_like

from prmkern.kernels import rms_norm


def _reference(x, weight, eps, residual):
    """The seam's semantics, spelled out: s = x + residual in x's dtype, normalised in float64."""
    s = x + residual if residual is not None else x
    sd = s.double()
    normed = sd / torch.sqrt(sd.pow(2).mean(-1, keepdim=True) + eps)
    return normed * weight.double(), s


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,with_residual", [((5, 64), False), ((3, 2, 97), True), ((1, 1536), True)])
def test_rms_norm_matches_reference(dtype, shape, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEVICE)
    residual = torch.randn(shape, generator=g).to(dtype).to(DEVICE) if with_residual else None
    out = nan_like(shape, dtype)
    residual_out = nan_like(shape, dtype) if with_residual else None
    x_before = x.clone()

    normed, new_residual = rms_norm(x=x, weight=weight, eps=1e-6, residual=residual, out=out,
                                    residual_out=residual_out)
    expected, expected_residual = _reference(x, weight, 1e-6, residual)
    assert normed is out
    # normed is rounded to the dtype twice (before and after the weight): allow two roundings of |y| <= ~4.
    assert_close(normed, expected, dtype, "rms_norm out", scale=4.0)
    if with_residual:
        assert torch.equal(new_residual, expected_residual), "residual_out must be exactly x + residual"
    else:
        assert new_residual is None
    assert torch.equal(x, x_before), "x must not be modified"


def test_rms_norm_in_place_residual_and_weight_promotion():
    """residual_out may alias residual (vLLM's in-place fused add); an fp32 weight promotes the output to fp32."""
    x = torch.randn(4, 48).half().to(DEVICE)
    residual = torch.randn(4, 48).half().to(DEVICE)
    weight = torch.rand(48, device=DEVICE) + 0.5  # float32
    expected, expected_residual = _reference(x, weight, 1e-5, residual)
    normed, new_residual = rms_norm(x=x, weight=weight, eps=1e-5, residual=residual, residual_out=residual)
    assert new_residual is residual and torch.equal(residual, expected_residual)
    assert normed.dtype == torch.float32
    assert_close(normed, expected, torch.float16, "rms_norm fp32 weight", scale=2.0)

"""The C++ fused residual-add + RMSNorm and SiLU-and-mul (csrc/elementwise.cpp) against float64 formulas, in fp32
and bf16, odd widths, with and without a residual; the cpp backend's routing (other shapes and dtypes fall back to
the torch reference, which must agree)."""
from __future__ import annotations

import pytest
import torch

from prmkern.attention import get_backend
from prmkern.ops.cpp import cpp_ops

OPS = cpp_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="prmkern._C (csrc/) is not built")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _ref_norm(x, w, eps, residual):
    s = x.double() + (residual.double() if residual is not None else 0)
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w.double(), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden", [(1, 64), (16, 512), (5, 97), (517, 512)])  # 517 x 512: rows over threads
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_float64(dtype, rows, hidden, with_residual):
    g = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    r = torch.randn(rows, hidden, generator=g).to(dtype) if with_residual else None
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    out, res = OPS.add_rms_norm(x, r, w, 1e-6)
    want, want_res = _ref_norm(x, w, 1e-6, r)
    assert out.dtype == dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    if with_residual:
        torch.testing.assert_close(res.double(), want_res, atol=TOL[dtype], rtol=TOL[dtype])
        # the stored residual is exactly the dtype's x + residual (what the torch reference keeps)
        assert torch.equal(res, x + r)
    else:
        assert res is None
    # the backend method returns the torch reference's values (to the dtype's rounding)
    ref_out, ref_res = get_backend("torch").rms_norm(x, w, 1e-6, r)
    got_out, got_res = get_backend("cpp").rms_norm(x, w, 1e-6, r)
    torch.testing.assert_close(got_out.double(), ref_out.double(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, inter", [(1, 8), (16, 1408), (3, 197), (301, 1409)])  # 301 rows: over threads
def test_silu_and_mul_matches_float64(dtype, rows, inter):
    g = torch.Generator().manual_seed(inter)
    x = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    gate, up = x.double().chunk(2, dim=-1)
    want = gate * torch.sigmoid(gate) * up
    out = get_backend("cpp").silu_and_mul(x)
    assert out.shape == (rows, inter) and out.dtype == dtype
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_extremes(dtype):
    """The vectorised exp clamps its argument: huge |gate| still gives gate (positive) or ~0 (negative), NaN stays
    NaN, on the vector lanes and the scalar tail alike."""
    gate = torch.tensor([-1e30, -100., -88.5, -20., -1e-3, 0., 1e-3, 20., 88.5, 100., 1e30, float("nan")] * 2)
    x = torch.cat([gate, torch.full_like(gate, 1.5)])[None].to(dtype)
    out = get_backend("cpp").silu_and_mul(x).double()[0]
    g = x.double()[0, :gate.numel()]
    want = g * torch.sigmoid(g) * 1.5
    assert torch.isnan(out[torch.isnan(want)]).all()
    torch.testing.assert_close(out[~torch.isnan(want)], want[~torch.isnan(want)], atol=1e-30, rtol=TOL[dtype])


def test_other_shapes_fall_back_to_the_torch_reference():
    """3-D inputs (Qwen3's per-head q/k norm) and fp16 take the torch path and give its values."""
    b, t = get_backend("cpp"), get_backend("torch")
    x = torch.randn(4, 3, 24)
    w = torch.rand(24)
    torch.testing.assert_close(b.rms_norm(x, w, 1e-6)[0], t.rms_norm(x, w, 1e-6)[0])
    h = torch.randn(4, 10).half()
    torch.testing.assert_close(b.silu_and_mul(h), t.silu_and_mul(h))


def test_errors():
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS.silu_and_mul(torch.randn(2, 4).double())
    with pytest.raises(RuntimeError, match="weight"):
        OPS.add_rms_norm(torch.randn(2, 4), None, torch.ones(5), 1e-6)

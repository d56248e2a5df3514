"""merge_states / reduce_states against the float64 log-sum-exp formula, with empty (-inf) states on either side,
both sides empty, garbage in an empty state's out (weight 0 must not let it through), and fp16 outputs."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import DEVICE, assert_close, assert_lse_close, nan_like

from prmkern.kernels import merge_states, reduce_states


def _ref_merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.stack([l.double() for l in lses])  # [S, N, H]
    total = torch.logsumexp(lse, 0)  # -inf where all are empty
    w = torch.exp(lse - total.nan_to_num(neginf=0.0)).nan_to_num(nan=0.0)
    w = torch.where(torch.isinf(lse), torch.zeros_like(w), w)
    out = sum(w[s][..., None] * outs[s].double().nan_to_num(nan=0.0) for s in range(len(outs)))
    return out, total


def _states(n, h, d, num, seed):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(n, h, d, generator=g) for _ in range(num)]
    lses = [3 * torch.randn(n, h, generator=g) for _ in range(num)]
    lses[0][0, :] = float("-inf")  # row 0: first state empty
    outs[0][0, :] = float("nan")  # its out is garbage; weight 0 must keep it out
    for l in lses:
        l[1, 0] = float("-inf")  # row 1 head 0: every state empty
    return outs, lses


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,h,d", [(3, 4, 64), (5, 12, 128)])
def test_merge_two_states(out_dtype, n, h, d):
    outs, lses = _states(n, h, d, 2, seed=n)
    out = nan_like((n, h, d), out_dtype)
    lse = nan_like((n, h), torch.float32)
    merge_states(out_a=outs[0].to(DEVICE), lse_a=lses[0].to(DEVICE), out_b=outs[1].to(DEVICE),
                 lse_b=lses[1].to(DEVICE), out=out, lse_out=lse)
    ref_out, ref_lse = _ref_merge(outs, lses)
    assert_close(out, ref_out, out_dtype, "merge_states out")
    assert_lse_close(lse, ref_lse, "merge_states lse")
    assert torch.equal(out[1, 0].float().cpu(), torch.zeros(d)), "both empty: out must be 0"


def test_merge_state_with_unreduced_parts_and_reduce():
    n, h, d, s = 4, 3, 64, 5
    outs, lses = _states(n, h, d, s + 1, seed=9)
    parts_out = torch.stack(outs[1:], dim=2).to(DEVICE)  # [N, H, S, D]
    parts_lse = torch.stack(lses[1:], dim=2).to(DEVICE)  # [N, H, S]
    out, lse = merge_states(out_a=outs[0].to(DEVICE), lse_a=lses[0].to(DEVICE), out_b=parts_out, lse_b=parts_lse)
    ref_out, ref_lse = _ref_merge(outs, lses)
    assert_close(out, ref_out, torch.float32, "merge with parts")
    assert_lse_close(lse, ref_lse, "merge with parts lse")

    out2, lse2 = reduce_states(parts_out=parts_out, parts_lse=parts_lse, out_dtype=torch.float16)
    ref_out2, ref_lse2 = _ref_merge(outs[1:], lses[1:])
    assert out2.dtype == torch.float16
    assert_close(out2, ref_out2, torch.float16, "reduce_states")
    assert_lse_close(lse2, ref_lse2, "reduce_states lse")


def test_merge_in_place_into_a():
    outs, lses = _states(2, 2, 64, 2, seed=1)
    outs[0][0] = 0.0  # an empty state's out is 0 by contract when it is also the destination
    a_out, a_lse = outs[0].clone().to(DEVICE), lses[0].clone().to(DEVICE)
    merge_states(out_a=a_out, lse_a=a_lse, out_b=outs[1].to(DEVICE), lse_b=lses[1].to(DEVICE), out=a_out,
                 lse_out=a_lse)
    ref_out, ref_lse = _ref_merge(outs, lses)
    assert_close(a_out, ref_out, torch.float32, "merge in place")
    assert_lse_close(a_lse, ref_lse, "merge in place lse")

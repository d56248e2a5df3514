"""rotary against a float64 neox rotation from the same cos_sin_cache, in place on strided q/k views, with positions
out of order and repeated, head dims 64 and 128 and GQA head counts."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import DEVICE, assert_close, dtype_params

from prmkern.kernels import rotary


def _cos_sin_cache(max_pos: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [max_pos, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()  # [max_pos, D] = [cos | sin]


def _rotate64(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x = x.double()
    cos, sin = cs[:, None, :half].double(), cs[:, None, half:].double()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim", [(5, 4, 4, 64), (3, 8, 1, 128),
                                                                        (17, 12, 2, 128)])
def test_rotary_in_place_matches_reference(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    g = torch.Generator().manual_seed(3)
    cache = _cos_sin_cache(64, head_dim).to(DEVICE)
    positions = torch.randint(0, 64, (num_tokens,), generator=g).to(DEVICE)
    positions[0] = positions[-1]  # a repeated position
    # q and k as views into one fused qkv row, as the models produce them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    cs = cache[positions].cpu()
    q_expected, k_expected = _rotate64(q.cpu(), cs), _rotate64(k.cpu(), cs)

    q_out, k_out = rotary(q=q, k=k, positions=positions, cos_sin_cache=cache)
    assert q_out is q and k_out is k
    assert_close(q, q_expected, dtype, "rotary q", scale=2.0)
    assert_close(k, k_expected, dtype, "rotary k", scale=2.0)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before), "v must be untouched"


def test_rotary_int32_positions_equal_int64():
    cache = _cos_sin_cache(32, 64).to(DEVICE)
    q = torch.randn(4, 2, 64, device=DEVICE)
    k = torch.randn(4, 1, 64, device=DEVICE)
    pos = torch.tensor([3, 0, 31, 7], device=DEVICE)
    q2, k2 = q.clone(), k.clone()
    rotary(q=q, k=k, positions=pos, cos_sin_cache=cache)
    rotary(q=q2, k=k2, positions=pos.int(), cos_sin_cache=cache)
    assert torch.equal(q, q2) and torch.equal(k, k2)

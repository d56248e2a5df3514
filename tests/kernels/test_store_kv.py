"""store_kv: every stored slot equals the (cast) input exactly, every other slot keeps its NaN poison."""
from __future__ import annotations

import pytest
import torch
from tests.kernels.conftest import DEVICE, dtype_params

from prmkern.kernels import store_kv


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim,slot_dtype", [
    (16, 2, 128, torch.int64),
    (1, 1, 64, torch.int32),
    (16, 8, 64, torch.int64),
])
def test_store_kv_writes_exactly_the_mapped_slots(dtype, block_size, num_kv_heads, head_dim, slot_dtype):
    num_tokens = 17
    num_blocks = 40 // block_size + 1  # more slots than tokens
    g = torch.Generator().manual_seed(0)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE)  # float32: cast on store
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::4] = -1  # skipped tokens
    slot_mapping = slots.to(slot_dtype).to(DEVICE)

    store_kv(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)

    kf = k_cache.view(-1, num_kv_heads, head_dim).cpu()
    vf = v_cache.view(-1, num_kv_heads, head_dim).cpu()
    keep = slots >= 0
    assert torch.equal(kf[slots[keep]], key[keep].to(dtype).cpu())
    assert torch.equal(vf[slots[keep]], value[keep].to(dtype).cpu())
    untouched = torch.ones(kf.shape[0], dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.isnan(kf[untouched]).all() and torch.isnan(vf[untouched]).all(), "a slot not in the mapping changed"


def test_store_kv_strided_key_from_fused_qkv():
    """K and V are often views into one fused projection output; the launcher takes their strides."""
    num_tokens, num_kv_heads, head_dim = 7, 2, 64
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim, device=DEVICE)
    key = qkv[:, 4 * head_dim:(4 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (4 + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    k_cache = torch.zeros(2, 16, num_kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(3, 3 + num_tokens, device=DEVICE)
    store_kv(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[slots], key)
    assert torch.equal(v_cache.view(-1, num_kv_heads, head_dim)[slots], value)

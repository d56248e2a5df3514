"""The launchers refuse bad input before launching, with ValueError/TypeError messages that name the argument and
print the shapes or dtypes given. Nothing here launches a kernel."""
from __future__ import annotations

import pytest
import torch

from prmkern.kernels import (merge_states, paged_decode, paged_prefill, reduce_states, rms_norm, rotary, shared_prefix_decode,
                     silu_and_mul, store_kv)

I32 = torch.int32


def _cache(dtype=torch.float32, shape=(4, 16, 2, 64)):
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def _decode_kwargs(**over):
    k, v = _cache()
    kw = dict(q=torch.zeros(3, 8, 64), k_cache=k, v_cache=v, block_tables=torch.zeros(3, 2, dtype=I32),
              seq_lens=torch.ones(3, dtype=I32), scale=0.125)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(q=torch.zeros(3, 8, 32)), ValueError, r"q head_dim 32 \(q \(3, 8, 32\)\) != cache head_dim 64"),
    (dict(q=torch.zeros(3, 7, 64)), ValueError, r"num_heads 7 .* not a multiple of num_kv_heads 2"),
    (dict(q=torch.zeros(3, 8, 64, dtype=torch.float16)), TypeError,
     r"q, k_cache and v_cache must share a dtype, got torch.float16, torch.float32"),
    (dict(q=torch.zeros(3, 8, 64, dtype=torch.float64)), TypeError, r"q dtype torch.float64 not supported"),
    (dict(q=torch.zeros(3, 64, 8).transpose(1, 2)), ValueError, r"q must be contiguous in head_dim.*strides"),
    (dict(block_tables=torch.zeros(3, 2, dtype=torch.int64)), TypeError,
     r"block_tables must be int32, got torch.int64"),
    (dict(block_tables=torch.zeros(2, 2, dtype=I32)), ValueError, r"block_tables must have 2 dims with 3 rows, got "
                                                                  r"shape \(2, 2\)"),
    (dict(seq_lens=torch.ones(3, 1, dtype=I32)), ValueError, r"seq_lens must have 1 dims.*\(3, 1\)"),
    (dict(k_cache=torch.zeros(4, 16, 2, 64, 1)), ValueError,
     r"k_cache and v_cache must both be .*\(4, 16, 2, 64, 1\)"),
    (dict(num_splits=0), ValueError, r"num_splits must be a positive int, got 0"),
    (dict(out=torch.zeros(3, 8, 63)), ValueError, r"out must be \(3, 8, 64\).*got \(3, 8, 63\)"),
    (dict(lse_out=torch.zeros(3, 8, dtype=torch.float16)), ValueError, r"lse_out must be float32 \(3, 8\)"),
])
def test_paged_decode_errors(over, exc, pattern):
    with pytest.raises(exc, match="paged_decode: " + pattern):
        paged_decode(**_decode_kwargs(**over))


def test_paged_prefill_errors():
    k, v = _cache()
    kw = dict(q=torch.zeros(5, 8, 64), k_cache=k, v_cache=v, cu_seqlens_q=torch.tensor([0, 5], dtype=I32),
              seq_lens=torch.tensor([5], dtype=I32), block_tables=torch.zeros(1, 1, dtype=I32), scale=0.1, max_q_len=5)
    with pytest.raises(TypeError, match=r"paged_prefill: cu_seqlens_q must be int32, got torch.int64"):
        paged_prefill(**{**kw, "cu_seqlens_q": torch.tensor([0, 5])})
    with pytest.raises(ValueError, match=r"paged_prefill: seq_lens must have 1 dims with 1 rows, got shape \(2,\)"):
        paged_prefill(**{**kw, "seq_lens": torch.tensor([5, 5], dtype=I32)})
    with pytest.raises(ValueError, match=r"paged_prefill: max_q_len must be a non-negative int, got 5.0"):
        paged_prefill(**{**kw, "max_q_len": 5.0})
    with pytest.raises(ValueError, match=r"paged_prefill: q must be \[tokens, num_heads, head_dim\], got \(5, 512\)"):
        paged_prefill(**{**kw, "q": torch.zeros(5, 512)})
    with pytest.raises(TypeError):  # keyword-only: a positional call is refused
        paged_prefill(kw["q"], k, v)


def test_shared_prefix_decode_errors():
    k, v = _cache()
    kw = dict(q=torch.zeros(4, 8, 64), k_cache=k, v_cache=v, group_starts=torch.tensor([0, 4], dtype=I32),
              prefix_lens=torch.tensor([16], dtype=I32), prefix_block_tables=torch.zeros(1, 1, dtype=I32),
              scale=0.1, max_group_size=4)
    with pytest.raises(ValueError, match=r"shared_prefix_decode: prefix_lens must have 1 dims with 1 rows, got "
                                         r"shape \(2,\)"):
        shared_prefix_decode(**{**kw, "prefix_lens": torch.tensor([16, 16], dtype=I32)})
    with pytest.raises(ValueError, match=r"prefix_block_tables must have 2 dims with 1 rows, got shape \(3, 1\)"):
        shared_prefix_decode(**{**kw, "prefix_block_tables": torch.zeros(3, 1, dtype=I32)})
    with pytest.raises(ValueError, match=r"max_group_size must be a non-negative int, got None"):
        shared_prefix_decode(**{**kw, "max_group_size": None})
    with pytest.raises(ValueError, match=r"max_group_size is 0 but batch is 4"):
        shared_prefix_decode(**{**kw, "max_group_size": 0})


def test_store_kv_errors():
    k, v = _cache()
    kw = dict(key=torch.zeros(3, 2, 64), value=torch.zeros(3, 2, 64), k_cache=k, v_cache=v,
              slot_mapping=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"store_kv: key and value must both be \[num_tokens, 2, 64\] to match the "
                                         r"cache \(4, 16, 2, 64\), got \(3, 4, 64\)"):
        store_kv(**{**kw, "key": torch.zeros(3, 4, 64)})
    with pytest.raises(ValueError, match=r"slot_mapping must be \[num_tokens=3\], got \(4,\)"):
        store_kv(**{**kw, "slot_mapping": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"slot_mapping must be int64 or int32, got torch.float32"):
        store_kv(**{**kw, "slot_mapping": torch.zeros(3)})
    with pytest.raises(TypeError, match=r"k_cache and v_cache dtypes differ"):
        store_kv(**{**kw, "v_cache": torch.zeros(4, 16, 2, 64, dtype=torch.float16)})


def test_merge_and_reduce_errors():
    o, l = torch.zeros(2, 3, 64), torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"lse must be float32, got torch.float16"):
        merge_states(out_a=o, lse_a=l.half(), out_b=o, lse_b=l)
    with pytest.raises(ValueError, match=r"states disagree in shape: out_a \(2, 3, 64\), out_b \(2, 4, 64\)"):
        merge_states(out_a=o, lse_a=l, out_b=torch.zeros(2, 4, 64), lse_b=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"expected out/lse of shapes \[N, H, S, D\] and \[N, H, S\], got "
                                         r"\(2, 3, 64\) and \(2, 3\)"):
        reduce_states(parts_out=o, parts_lse=l)


def test_elementwise_errors():
    with pytest.raises(ValueError, match=r"rms_norm: weight must be \[hidden\] with hidden = x.shape\[-1\]; got x "
                                         r"\(4, 8\), weight \(9,\)"):
        rms_norm(x=torch.zeros(4, 8), weight=torch.ones(9), eps=1e-6)
    with pytest.raises(ValueError, match=r"rms_norm: residual must match x"):
        rms_norm(x=torch.zeros(4, 8), weight=torch.ones(8), eps=1e-6, residual=torch.zeros(4, 8).half())
    with pytest.raises(TypeError, match=r"rms_norm: x and weight must be floating .* got torch.int64"):
        rms_norm(x=torch.zeros(4, 8, dtype=torch.int64), weight=torch.ones(8), eps=1e-6)
    with pytest.raises(ValueError, match=r"silu_and_mul: x must be \[\.\.\., 2 \* intermediate\], got \(3, 5\)"):
        silu_and_mul(x=torch.zeros(3, 5))
    q, k = torch.zeros(2, 4, 64), torch.zeros(2, 1, 64)
    cache = torch.zeros(10, 64)
    with pytest.raises(ValueError, match=r"rotary: cos_sin_cache must be \[max_pos, 64\], got \(10, 32\)"):
        rotary(q=q, k=k, positions=torch.zeros(2, dtype=torch.int64), cos_sin_cache=torch.zeros(10, 32))
    with pytest.raises(TypeError, match=r"rotary: cos_sin_cache must be float32, got torch.float16"):
        rotary(q=q, k=k, positions=torch.zeros(2, dtype=torch.int64), cos_sin_cache=cache.half())
    with pytest.raises(ValueError, match=r"rotary: positions must be \[T=2\], got \(3,\)"):
        rotary(q=q, k=k, positions=torch.zeros(3, dtype=torch.int64), cos_sin_cache=cache)
    with pytest.raises(ValueError, match=r"rotary: q must be \[T, Hq, D\] and k \[T, Hkv, D\] with the same T and D"):
        rotary(q=q, k=torch.zeros(3, 1, 64), positions=torch.zeros(2, dtype=torch.int64), cos_sin_cache=cache)

"""The C++ cascade decode (csrc/paged_attention.cpp) against float64 attention written plainly: block sizes 1 and
16, GQA ratios 1 / 4 / 7, head dims 64 and 128, fp32 / bf16 / fp16 caches, odd lengths, groups with and without
a shared prefix, never-written pool slots holding NaN (tests/kernels/conftest.py); and the engine's tokens with the
C++ backend equal the torch backend's."""
from __future__ import annotations

import pytest
import torch

from prmkern.attention import DecodeMetadata, get_backend
from prmkern.ops.cpp import cpp_ops
from tests.kernels.conftest import make_cascade, ref_paged_decode

OPS = cpp_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="prmkern._C (csrc/) is not built")
TOL = {torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}  # caches are read exactly; math in fp32


def _meta(c: dict) -> DecodeMetadata:
    return DecodeMetadata(**{k: v for k, v in c.items() if k in DecodeMetadata.__dataclass_fields__})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size, group, head_dim", [(1, 1, 64), (16, 4, 128), (16, 7, 64), (4, 4, 64)])
def test_cascade_decode_matches_float64(dtype, block_size, group, head_dim):
    kv_heads = 2
    # a 3-chain group sharing 3 blocks, a lone chain, a 2-chain group, a single chain with a prefix of its own
    groups = [(3, [1, 17, 5]), (0, [9]), (2 if block_size > 1 else 37, [33, 2]), (1, [3])]
    c = make_cascade(groups, block_size, kv_heads, head_dim, dtype, seed=block_size + group)
    b = len(c["seq_lens_list"])
    q = torch.randn(b, kv_heads * group, head_dim).to(torch.float32)
    scale = head_dim ** -0.5
    ref, _ = ref_paged_decode(q, c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens_list"], scale)
    meta = _meta(c)
    out = get_backend("cpp").decode(q, c["k_cache"], c["v_cache"], meta, scale)
    assert not torch.isnan(out).any(), "NaN: a never-written (NaN) slot was read"
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_long_prefix_many_chains_and_low_precision_queries():
    """A prefix longer than several key chunks, 16 chains, queries in bf16 (the output follows q's dtype)."""
    c = make_cascade([(40, [1 + 3 * i for i in range(16)])], 16, 2, 64, torch.bfloat16, seed=9)
    q = torch.randn(16, 8, 64).to(torch.bfloat16)
    ref, _ = ref_paged_decode(q, c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens_list"], 0.125)
    out = get_backend("cpp").decode(q, c["k_cache"], c["v_cache"], _meta(c), 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_metadata_errors():
    c = make_cascade([(1, [3, 4])], 4, 2, 64, torch.float32)
    q = torch.randn(2, 4, 64)
    args = [c[k] for k in ("group_starts", "prefix_lens", "prefix_block_tables", "suffix_lens", "suffix_block_tables")]
    with pytest.raises(RuntimeError, match="heads"):
        OPS.cascade_decode(torch.randn(2, 3, 64), c["k_cache"], c["v_cache"], *args, 0.1)
    with pytest.raises(RuntimeError, match="int32"):
        OPS.cascade_decode(q, c["k_cache"], c["v_cache"], args[0].long(), *args[1:], 0.1)
    with pytest.raises(RuntimeError, match="chains"):
        OPS.cascade_decode(q[:1], c["k_cache"], c["v_cache"], *args, 0.1)
    bad = args[4].clone()
    bad[1, 0] = c["k_cache"].shape[0]  # a block past the pool
    with pytest.raises(RuntimeError, match="names block"):
        OPS.cascade_decode(q, c["k_cache"], c["v_cache"], *args[:4], bad, 0.1)
    short = args[3].clone()
    short[0] = 4 * args[4].shape[1] + 1  # longer than its table
    with pytest.raises(RuntimeError, match="has length"):
        OPS.cascade_decode(q, c["k_cache"], c["v_cache"], *args[:3], short, args[4], 0.1)


def test_engine_tokens_match_torch_backend(qwen2_dir):
    """fp32 greedy chains over a shared prompt: the C++ backend (attention, GEMMs, norms) gives the torch
    backend's tokens."""
    from prmkern import LLM, SamplingParams
    from tests.conftest import random_prompts

    prompts = random_prompts([37, 11], 509, seed=4)
    params = [SamplingParams(temperature=1.0, top_k=1, max_tokens=m, ignore_eos=True, n=5) for m in (6, 9)]

    def run(backend: str):
        llm = LLM(qwen2_dir, device="cpu", dtype=torch.float32, attention_backend=backend, block_size=4)
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]

    assert run("cpp") == run("torch")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bf16_decode_logprobs_match_transformers_fp32(qwen2_dir, backend):
    """bf16 decode steps of 4 chains sharing a prompt: every chain's log-probabilities over the whole vocabulary
    against transformers in fp32 on the same tokens, within bf16 accuracy (greedy tokens themselves may flip
    between backends on near-ties, so the tokens are not compared)."""
    from prmkern import LLM, SamplingParams
    from tests.conftest import hf_model, random_prompts

    ids = random_prompts([37], 509, seed=2)[0]
    llm = LLM(qwen2_dir, device="cpu", dtype=torch.bfloat16, attention_backend=backend, block_size=8)
    vocab = list(range(509))
    outs = llm.generate([ids], SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True, seed=3,
                                              logprob_token_ids=vocab))[0].outputs
    hf = hf_model(qwen2_dir)
    for out in outs:
        full = ids + out.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].double(), -1)[len(ids) - 1:len(full) - 1]
        ours = torch.tensor([[pos[i] for i in vocab] for pos in out.token_logprobs], dtype=torch.float64)
        assert not torch.isnan(ours).any()
        err = float((ours - ref).abs().max() / ref.abs().max())
        assert err < 1.5e-2, f"{backend}: bf16 log-probabilities differ from fp32 by {err:.3g} (relative)"

"""Our forward pass against Hugging Face transformers on the same random-weight checkpoints."""
from __future__ import annotations

import pytest
import torch

from prmkern import LLM, SamplingParams
from prmkern.attention import AttentionMetadata, PrefillMetadata, get_backend
from prmkern.models import ForwardContext, UnsupportedArchitectureError, load_model
from tests.conftest import CHECKPOINTS, hf_model, random_prompts


def our_prefill_logits(path: str, ids: list[int], dtype=torch.float32, block_size: int = 16) -> torch.Tensor:
    """Logits at every position of `ids` from one prefill through our model and the torch backend."""
    model = load_model(path, dtype, "cpu")
    spec = model.spec
    n = len(ids)
    nblk = -(-n // block_size)
    shape = (nblk, block_size, spec.num_kv_heads, spec.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(spec.num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        prefill=PrefillMetadata(cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
                                seq_lens=torch.tensor([n], dtype=torch.int32),
                                block_tables=torch.arange(nblk, dtype=torch.int32)[None], max_q_len=n, max_seq_len=n))
    ctx = ForwardContext(get_backend("torch"), meta, caches, model.cos_sin_cache)
    hidden = model(torch.tensor(ids), torch.arange(n), ctx)
    return model.compute_logits(hidden)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_prefill_logits_match_transformers(checkpoint_dirs, name):
    path = checkpoint_dirs[name]
    ids = random_prompts([150], 509, seed=1)[0]  # > llama3's original context of 128: exercises the scaling
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([ids])).logits[0].float()
    ours = our_prefill_logits(path, ids)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("name", ["qwen2", "llama3", "qwen3"])
def test_decode_logprobs_match_transformers(checkpoint_dirs, name):
    """Decode steps (cascade attention over paged KV) give the model's log-probabilities at every position."""
    path = checkpoint_dirs[name]
    ids = random_prompts([37], 509, seed=2)[0]
    llm = LLM(path, device="cpu", block_size=8)
    vocab = list(range(509))
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                             logprob_token_ids=vocab))[0].outputs[0]
    full = ids + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([full])).logits[0].double(), -1)
    ours = torch.tensor([[pos[i] for i in vocab] for pos in out.token_logprobs], dtype=torch.float64)
    assert rel_err(ours, ref[len(ids) - 1:len(full) - 1]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_close(qwen2_dir, dtype):
    ids = random_prompts([40], 509, seed=3)[0]
    with torch.no_grad():
        ref = hf_model(qwen2_dir, dtype)(torch.tensor([ids])).logits[0].float()
    ours = our_prefill_logits(qwen2_dir, ids, dtype)
    # Same dtype, different op order: a few units of the half-precision epsilon, relative to the logit scale.
    assert rel_err(ours, ref) < (4e-2 if dtype == torch.bfloat16 else 5e-3)


def test_unsupported_architecture_names_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2ForCausalLM.*|.*LlamaForCausalLM"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_missing_checkpoint_files(tmp_path, qwen2_dir):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text(open(f"{qwen2_dir}/config.json").read())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LLM(str(tmp_path))


def test_bad_dtype_lists_accepted(qwen2_dir):
    with pytest.raises(ValueError, match="float32"):
        LLM(qwen2_dir, dtype="int8")

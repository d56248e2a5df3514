"""The one-call decode layer (`_C.decode_layer`, prmkern/models/fused_layer.py) against the same layer
run op by op through the modules: identical logprobs on Qwen2 (q/k/v bias) and Llama (none), fp32 and bf16, with
shared prefixes and chains of different lengths, with and without column-panel weight copies; it is really taken on
decode steps, and left for what it does not take (Qwen3's q/k norm, forward hooks as tensor parallelism
registers)."""
from __future__ import annotations

import pytest
import torch

from prmkern import LLM, SamplingParams
from prmkern.models.fused_layer import FusedDecoderLayer
from prmkern.ops.cpp import cpp_ops
from prmkern.tiny import build_checkpoint

pytestmark = [pytest.mark.skipif(cpp_ops() is None, reason="prmkern._C (csrc/) is not built"),
              pytest.mark.filterwarnings("ignore:prmkern. no tokenizer files")]


def _run(path: str, dtype: str, fused: bool, monkeypatch, panel_budget: int = 1 << 30) -> tuple[list, int]:
    calls = {"taken": 0}
    original = FusedDecoderLayer.forward

    def counting(self, *args):
        out = original(self, *args) if fused else None
        calls["taken"] += out is not None
        return out

    monkeypatch.setattr(FusedDecoderLayer, "forward", counting)
    llm = LLM(path, dtype=dtype, device="cpu", attention_backend="cpp", num_kvcache_blocks=64,
              packed_gemm_bytes=panel_budget)
    prompts = [list(range(3, 40)), list(range(3, 40)) + [7, 9], [5, 6, 7]]  # a shared prefix, and one alone
    params = SamplingParams(n=3, temperature=0.8, max_tokens=12, seed=3, logprobs=2)
    outs = llm.generate(prompts, params)
    monkeypatch.setattr(FusedDecoderLayer, "forward", original)
    result = [(c.token_ids, [sorted(lp.items()) for lp in c.logprobs]) for o in outs for c in o.outputs]
    return result, calls["taken"]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("panel_budget", [1 << 30, 0])  # GEMMs on column-panel copies, and on the weights
def test_fused_layer_equals_op_by_op(tmp_path, monkeypatch, arch, dtype, panel_budget):
    path = build_checkpoint(str(tmp_path / arch), arch, dtype=getattr(torch, dtype), vocab_size=256,
                            hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, tokenizer=False, seed=11)
    fused, taken = _run(path, dtype, True, monkeypatch, panel_budget)
    plain, not_taken = _run(path, dtype, False, monkeypatch, panel_budget)
    assert taken > 0 and not_taken == 0
    assert fused == plain  # the same ops in the same order: bit-identical


def test_not_taken_for_qk_norm_or_hooks(tmp_path, monkeypatch):
    path = build_checkpoint(str(tmp_path / "q3"), "qwen3", vocab_size=256, hidden_size=128, intermediate_size=192,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            tokenizer=False)
    _, taken = _run(path, "float32", True, monkeypatch)
    assert taken == 0  # Qwen3's per-head q/k RMSNorm is not in the fused layer

    path = build_checkpoint(str(tmp_path / "q2"), "qwen2", vocab_size=256, hidden_size=128, intermediate_size=192,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tokenizer=False)
    llm = LLM(path, dtype="float32", device="cpu", attention_backend="cpp")
    seen = []
    for layer in llm.engine.runner.model.model.layers:  # as tensor parallelism's all-reduce is registered
        layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(1))
    llm.generate([[3, 4, 5, 6]], SamplingParams(max_tokens=4))
    assert len(seen) == 2 * 4  # every layer's o_proj ran as a module on the prefill and the 3 decode steps

"""One decoder-only transformer that covers the Qwen2, Llama and Qwen3 families.

The architectures differ only in a few switches (`DecoderSpec`): q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3),
an explicit head_dim, rope scaling, tied embeddings. Parameter names follow the Hugging Face checkpoints, except
that q/k/v and gate/up are stacked into one matrix each (one matmul instead of three / two); the loader maps them.
Attention, norms, rotary and the MLP activation go through the attention backend, so the same model runs on the
torch reference and on Triton kernels. With prmkern's C++ CPU kernels (`use_cpu_kernels`, lent by the runner when
the backend declares `cpu_kernels`) its GEMMs run in C++ and the model itself decides to run a decode step's layer
in one call (fused_layer.py). It knows nothing of sequences: it maps token ids + positions to hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from prmkern.attention import AttentionBackend, AttentionMetadata
from prmkern.models.fused_layer import FusedDecoderLayer
from prmkern.models.packed_gemm import Linear
from prmkern.models.rope import cos_sin_cache, rope_parameters


@dataclass(frozen=True)
class DecoderSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: dict[str, Any]
    eos_token_ids: tuple[int, ...]
    # The output head: "lm" (a vocabulary projection, for generation) or "prm" (a process reward model's score
    # head of num_labels classes, for pooling: prmkern/models/qwen2_prm.py).
    head: str = "lm"
    num_labels: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any], architecture: str, *, qkv_bias: bool, o_bias: bool,
                    qk_norm: bool) -> "DecoderSpec":
        num_heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // num_heads
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=qk_norm,
            rope=rope_parameters(config),
            eos_token_ids=eos_ids,
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.head_dim ** -0.5
        self.qkv_proj = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(self.q_size, spec.hidden_size, bias=spec.o_bias)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        backend = ctx.backend
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = backend.rms_norm(q, self.q_norm.weight, self.q_norm.eps)[0]
            k = backend.rms_norm(k, self.k_norm.weight, self.k_norm.eps)[0]
        k_cache, v_cache = ctx.kv_caches[self.layer_index]
        meta = ctx.attn_metadata
        q = backend.rotary_store_kv(q, k, v, positions, ctx.cos_sin_cache, k_cache, v_cache, meta.slot_mapping,
                                    meta.all_slots_valid)
        if meta.prefill is not None:
            out = backend.prefill(q, k_cache, v_cache, meta.prefill, self.scale)
        else:
            out = backend.decode(q, k_cache, v_cache, meta.decode, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        return self.down_proj(backend.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_index)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)
        self.fused: FusedDecoderLayer | None = None  # set by DecoderForCausalLM.use_cpu_kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                ctx: "ForwardContext") -> tuple[torch.Tensor, torch.Tensor]:
        b = ctx.backend
        if self.fused is not None:  # the one-call C++ decode layer, when it takes this layer and step
            out = self.fused.forward(self, x, residual, positions, ctx)
            if out is not None:
                return out
        if residual is None:
            residual = x
            h = b.rms_norm(x, self.input_layernorm.weight, self.input_layernorm.eps)[0]
        else:
            h, residual = b.rms_norm(x, self.input_layernorm.weight, self.input_layernorm.eps, residual)
        h = self.self_attn(h, positions, ctx)
        h, residual = b.rms_norm(h, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps, residual)
        return self.mlp(h, b), residual


@dataclass
class ForwardContext:
    """What one forward pass reads besides token ids and positions; built by the runner each step."""

    backend: AttentionBackend
    attn_metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [num_blocks, block_size, Hkv, D]
    cos_sin_cache: torch.Tensor  # [max_positions, head_dim] float32


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """Module tree `model.*` + `lm_head` as in Hugging Face checkpoints (lm_head shares embed_tokens when tied)."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # [max_positions, head_dim] float32; built by init_rope() on the model's device (not under "meta").
        self.cos_sin_cache = torch.empty(0)

    def init_rope(self, device: torch.device | str) -> None:
        spec = self.spec
        self.cos_sin_cache = cos_sin_cache(spec.head_dim, spec.max_position_embeddings, spec.rope, device)

    def use_cpu_kernels(self, ops: ModuleType | None) -> None:
        """Runs the model on prmkern's C++ CPU kernels (`ops`, prmkern/ops/cpp.py) or, with None, on torch's: every
        Linear's GEMMs, and each decoder layer of a decode step as one call where the layer allows it."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.cpp = ops
        fused = FusedDecoderLayer(ops) if ops is not None else None
        for layer in self.model.layers:
            layer.fused = fused

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, ctx)
        return ctx.backend.rms_norm(x, self.model.norm.weight, self.model.norm.eps, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        return self.lm_head(hidden).float()

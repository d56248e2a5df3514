"""Llama 2/3.x: optional `attention_bias` on all four projections, llama3 rope scaling (handled in rope.py)."""
from typing import Any

from prmkern.models.decoder import DecoderSpec


def llama_spec(config: dict[str, Any]) -> DecoderSpec:
    bias = bool(config.get("attention_bias", False))
    return DecoderSpec.from_config(config, "llama", qkv_bias=bias, o_bias=bias, qk_norm=False)

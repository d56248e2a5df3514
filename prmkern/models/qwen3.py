"""Qwen3 (dense): no projection biases (unless `attention_bias`), q and k RMS-normalised per head before rotary."""
from typing import Any

from prmkern.models.decoder import DecoderSpec


def qwen3_spec(config: dict[str, Any]) -> DecoderSpec:
    bias = bool(config.get("attention_bias", False))
    return DecoderSpec.from_config(config, "qwen3", qkv_bias=bias, o_bias=bias, qk_norm=True)

"""Qwen2 (and DeepSeek-R1-Distill-Qwen, the base of ThinkPRM and GenPRM): biases on q/k/v, none on o."""
from typing import Any

from prmkern.models.decoder import DecoderSpec


def qwen2_spec(config: dict[str, Any]) -> DecoderSpec:
    return DecoderSpec.from_config(config, "qwen2", qkv_bias=True, o_bias=False, qk_norm=False)

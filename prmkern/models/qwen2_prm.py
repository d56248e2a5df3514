"""Qwen2 with a process reward head (Qwen2.5-Math-PRM-7B / -72B, architecture "Qwen2ForProcessRewardModel").

The released model is the Qwen2 decoder (`model.*`, the same weights and names as Qwen2ForCausalLM) followed, at
every position, by `score`: Linear(hidden, hidden) -> ReLU -> Linear(hidden, 2), both with biases (checkpoint names
`score.0.*` and `score.2.*`; index 1 is the ReLU). It has no vocabulary head: it scores, it does not generate.
The probability that the step ending at a step-separator token (`<extra_0>`) is correct is softmax(score)[1] at
that token's position. Sources: the Qwen2.5-Math-PRM-7B model card's usage (`make_step_rewards`: softmax over the two
labels at the positions where input_ids == tokenizer.encode("<extra_0>")[0], column 1 kept) and vLLM's
Qwen2ForProcessRewardModel (the same head; pooling type STEP with softmax at step_tag_id 151651, the id of
`<extra_0>` in that checkpoint's tokenizer).

This file defines the head and the model class; which rows are pooled is prmkern/pooling.py's business.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from prmkern.models.decoder import DecoderForCausalLM, DecoderModel, DecoderSpec

# The step separator of Qwen2.5-Math-PRM, and its id in that checkpoint's tokenizer (vLLM's default step_tag_id);
# the id is read from the tokenizer when there is one (prmkern/pooling.py).
STEP_TAG = "<extra_0>"
STEP_TAG_ID = 151651


def qwen2_prm_spec(config: dict[str, Any]) -> DecoderSpec:
    spec = DecoderSpec.from_config(config, "qwen2-prm", qkv_bias=True, o_bias=False, qk_norm=False)
    # The released class fixes two labels whatever config.json says (vLLM sets num_labels = 2 as well).
    return replace(spec, head="prm", num_labels=2, tie_word_embeddings=False)


class DecoderForProcessReward(DecoderForCausalLM):
    """`model.*` as in DecoderForCausalLM, `score` instead of `lm_head`; compute_logits gives the head's class
    logits [N, num_labels] (float32) so the runner's row selection serves pooling unchanged."""

    def __init__(self, spec: DecoderSpec):
        assert spec.head == "prm" and spec.num_labels > 0, f"not a PRM spec: head={spec.head} {spec.num_labels}"
        nn.Module.__init__(self)
        self.spec = spec
        self.model = DecoderModel(spec)
        h = spec.hidden_size
        # Plain nn.Linear (not the engine's decode GEMM): it runs on the few pooled rows of a prefill only.
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, spec.num_labels))
        self.cos_sin_cache = torch.empty(0)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> class logits [N, num_labels] float32."""
        return self.score(hidden).float()

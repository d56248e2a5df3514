"""The sampling defaults a checkpoint ships in generation_config.json, read as vLLM reads them
(ModelConfig.get_diff_sampling_param): LLM.get_default_sampling_params() and the server's defaults.

Only repetition_penalty, temperature, top_k, top_p, min_p and max_new_tokens (as max_tokens) are taken; a value
equal to transformers' GenerationConfig default counts as unset (vLLM reads the file's diff against those
defaults). `generation_config` is vLLM's argument: "auto" (the model's folder), "vllm" (no defaults) or a folder
holding a generation_config.json. It does not apply stop or EOS ids: the engine reads EOS from config.json.
"""
from __future__ import annotations

import json
import os
from typing import Any

SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
# transformers.GenerationConfig's own defaults for those keys (a file value equal to them is no default at all)
HF_DEFAULTS = {"repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None,
               "max_new_tokens": None}


def sampling_defaults(model: str, generation_config: str = "auto") -> dict[str, Any]:
    """SamplingParams keyword arguments from the generation config; {} when there is none or it sets nothing."""
    if generation_config == "vllm":
        return {}
    folder = model if generation_config == "auto" else generation_config
    if not isinstance(folder, str) or not os.path.isdir(folder):
        raise ValueError(f"generation_config={generation_config!r} is invalid; accepted: 'auto' (the model's "
                         f"generation_config.json), 'vllm' (none), or a folder holding a generation_config.json")
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    out = {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None and config[k] != HF_DEFAULTS[k]}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out

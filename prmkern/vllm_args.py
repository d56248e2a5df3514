"""vLLM engine arguments that a vLLM script passes to LLM(...) and that prmkern does not take as its own: each is
accepted with a documented meaning, accepted and ignored with a one-line warning, or rejected with an error that
names what is supported. Never a bare TypeError for a vLLM argument; an unknown name is a TypeError listing these.
"""
from __future__ import annotations

import warnings
from typing import Any

# Ignored whatever the value: they configure something prmkern does not have (no log of stats, chunked prefill is
# always on, nothing is downloaded, no swap: preempted chains are recomputed from the prefix cache).
IGNORED = {
    "disable_log_stats": "prmkern logs no periodic stats",
    "enable_chunked_prefill": "chunked prefill is always on",
    "swap_space": "prmkern recomputes preempted chains (prefix cache) instead of swapping KV to the CPU",
    "disable_custom_all_reduce": "one device only",
    "distributed_executor_backend": "one device only",
    "compilation_config": "prmkern captures CUDA graphs of decode steps itself (enforce_eager=True turns them off)",
    "max_seq_len_to_capture": "see max_graph_batch",
    "download_dir": "prmkern loads local checkpoint directories and downloads nothing",
    "revision": "prmkern loads local checkpoint directories and downloads nothing",
    "tokenizer_revision": "prmkern loads local checkpoint directories and downloads nothing",
    "code_revision": "prmkern runs no checkpoint code",
    "hf_token": "prmkern downloads nothing",
    "disable_async_output_proc": "no effect",
    "max_logprobs": "logprobs are bounded by the vocabulary only",
    "allowed_local_media_path": "text only",
    "use_v2_block_manager": "no effect",
    "worker_cls": "no effect",
    "served_model_name": "the offline API has no served name",
    "scheduling_policy": "first come, first served",
    "disable_sliding_window": "no sliding-window models are supported",
    "task": "generation only",
    "runner": "generation only",
    "enable_sleep_mode": "no sleep mode",
    "async_scheduling": "steps run synchronously",
    "num_scheduler_steps": "one step per schedule",
    "limit_mm_per_prompt": "text only",
    "mm_processor_kwargs": "text only",
}
# Silent when they hold vLLM's default (or the value prmkern has anyway).
DEFAULTS = {"swap_space": 4, "disable_log_stats": True, "enable_chunked_prefill": True, "tokenizer_mode": "auto",
            "load_format": "auto", "kv_cache_dtype": "auto", "cpu_offload_gb": 0, "quantization": None,
            "pipeline_parallel_size": 1, "enable_lora": False, "hf_overrides": None,
            "trust_remote_code": False, "task": "auto", "runner": "auto",
            "scheduling_policy": "fcfs", "disable_sliding_window": False, "served_model_name": None,
            "enable_sleep_mode": False, "async_scheduling": False, "num_scheduler_steps": 1,
            "limit_mm_per_prompt": None, "mm_processor_kwargs": None}
# Values other than these are an error (the feature does not exist in prmkern).
ONLY = {
    "pipeline_parallel_size": ((1,), "pipeline parallelism is not implemented: prmkern runs on one device"),
    "quantization": ((None,), "quantized checkpoints are not supported; dtypes: float32, bfloat16, float16"),
    "kv_cache_dtype": (("auto",), "the KV cache has the model's dtype"),
    "cpu_offload_gb": ((0, 0.0), "weights are not offloaded"),
    "enable_lora": ((False,), "LoRA adapters are not supported at inference (merge them: train/lora.py)"),
    "hf_overrides": ((None, {}), "config overrides are not supported; edit config.json"),
    "load_format": (("auto", "safetensors"), "safetensors checkpoints only"),
    "tokenizer_mode": (("auto", "slow"), "Hugging Face tokenizers"),
    "logits_processors": ((None, []), "custom logits processors are not supported"),
}


def _warn(name: str, value: Any, why: str) -> None:
    warnings.warn(f"prmkern: {name}={value!r} is accepted for vLLM compatibility and ignored: {why}", stacklevel=4)


def check_vllm_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validates the vLLM-only arguments; returns those that prmkern uses (skip_tokenizer_init, tokenizer_mode,
    generation_config)."""
    used: dict[str, Any] = {}
    known = set(IGNORED) | set(ONLY) | {"trust_remote_code", "skip_tokenizer_init", "generation_config"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"LLM() got unexpected arguments {unknown}; prmkern's own are listed in docs/api.md, and "
                        f"these vLLM arguments are accepted: {sorted(known)}")
    for name, value in kwargs.items():
        if name in ONLY:
            allowed, why = ONLY[name]
            if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
                error = NotImplementedError if name.endswith("parallel_size") else ValueError
                raise error(f"{name}={value!r} is not supported: {why}; supported: "
                            f"{' or '.join(repr(a) for a in allowed)}")
            if name == "tokenizer_mode":
                used[name] = value
        elif name == "trust_remote_code":
            if not isinstance(value, bool):
                raise ValueError(f"trust_remote_code={value!r} is invalid; accepted: True or False")
            if value:
                warnings.warn("prmkern: trust_remote_code=True is accepted and has no effect: prmkern runs no code "
                              "from checkpoints (its own implementations of Qwen2, Qwen3 and Llama only)",
                              stacklevel=3)
        elif name == "generation_config":
            if not isinstance(value, str):
                raise ValueError(f"generation_config={value!r} is invalid; accepted: 'auto', 'vllm' or a folder")
            used[name] = value
        elif name == "skip_tokenizer_init":
            if not isinstance(value, bool):
                raise ValueError(f"skip_tokenizer_init={value!r} is invalid; accepted: True or False")
            used[name] = value
        elif DEFAULTS.get(name, object()) != value:
            _warn(name, value, IGNORED[name])
    return used

"""Load a Hugging Face checkpoint directory into our decoder: config.json, model.safetensors or a sharded index.

Maps checkpoint names onto our stacked projections (q/k/v -> qkv_proj, gate/up -> gate_up_proj). Errors name what
is supported or expected. Does not download anything: `model` must be a local directory.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

from prmkern.models.decoder import DecoderForCausalLM, DecoderSpec
from prmkern.models.llama import llama_spec
from prmkern.models.qwen2 import qwen2_spec
from prmkern.models.qwen2_prm import DecoderForProcessReward, qwen2_prm_spec
from prmkern.models.qwen3 import qwen3_spec
from prmkern.models.safetensors_reader import TensorRef, tensor_refs

ARCHITECTURES: dict[str, Callable[[dict[str, Any]], DecoderSpec]] = {
    "Qwen2ForCausalLM": qwen2_spec,
    "LlamaForCausalLM": llama_spec,
    "Qwen3ForCausalLM": qwen3_spec,
    "Qwen2ForProcessRewardModel": qwen2_prm_spec,
}
# The module class of each output head (DecoderSpec.head).
MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {"lm": DecoderForCausalLM, "prm": DecoderForProcessReward}

# checkpoint projection name -> (our stacked name, shard index)
_STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


class UnsupportedArchitectureError(ValueError):
    pass


def resolve_dtype(dtype: str | torch.dtype | None, config: dict[str, Any]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of float32, bfloat16, float16")
        return dtype
    if dtype in (None, "auto"):
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(set(DTYPES))} or 'auto'")
    return DTYPES[dtype]


def read_config(model_dir: str) -> dict[str, Any]:
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model {model_dir!r} is not a local directory; prmkern loads Hugging Face checkpoint "
                                f"directories (config.json, model.safetensors or model.safetensors.index.json, "
                                f"tokenizer files) and downloads nothing")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: a checkpoint directory needs config.json")
    with open(path) as f:
        return json.load(f)


def model_spec(config: dict[str, Any]) -> DecoderSpec:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            try:
                return ARCHITECTURES[arch](config)
            except KeyError as e:
                raise ValueError(f"config.json lacks the key {e.args[0]!r}, which {arch} needs") from None
            except (TypeError, ValueError, ZeroDivisionError) as e:
                raise ValueError(f"config.json holds values {arch} cannot use: {type(e).__name__}: {e}") from None
    raise UnsupportedArchitectureError(f"architecture {archs or config.get('model_type')!r} is not supported; "
                                       f"supported: {sorted(ARCHITECTURES)}")


def _safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [os.path.join(model_dir, s) for s in shards]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no weights in {model_dir}: expected model.safetensors or model.safetensors.index.json "
                            f"(PyTorch .bin checkpoints are not supported)")


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device | str) -> DecoderForCausalLM:
    config = read_config(model_dir)
    spec = model_spec(config)
    with torch.device("meta"):
        model = MODEL_CLASSES[spec.head](spec)
    # dtype first, on the meta device: the parameters are allocated once, in `dtype` (no fp32 staging copy), and
    # filled straight from the files (safetensors_reader: no copy of the file in memory either)
    model = model.to(dtype).to_empty(device=device)
    model.init_rope(device)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    with torch.no_grad():
        for file in _safetensors_files(model_dir):
            for ref in tensor_refs(file):
                _load_tensor(model, spec, params, ref.name, ref, loaded)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    check_all_loaded(params, loaded, model_dir)
    return model.eval()


def check_all_loaded(params, loaded: set[str], model_dir: str) -> None:
    """Raises naming the parameters no checkpoint tensor filled (fused q/k/v and gate/up count per part, '#i')."""
    expected = set()
    for n in params:
        shards = 3 if ".qkv_proj." in n else 2 if ".gate_up_proj." in n else 0
        expected.update([f"{n}#{i}" for i in range(shards)] if shards else [n])
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def k_major_weights(model: torch.nn.Module) -> None:
    """Store every projection's weight [out, in] transposed in memory (a [out, in] view over [in, out] storage).

    Weights load in the checkpoint's [out, in] layout, which the C++ decode GEMM streams for every dtype and which
    bf16/fp16 matmuls need (against this transposed layout they crawl at ~0.08 GB/s). The runner applies this only
    for the torch backend in fp32 on the CPU, where MKL's GEMMs prefer it:

    On the CPU, GEMM with a few rows (decode: one row per running sequence) runs 1.4-1.9x faster against this
    layout for this model family's shapes (measured with MKL at 16 rows, one thread); large prefill products are
    about as fast. The values and the parameter shapes are unchanged, only the strides."""
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            module.weight.data = module.weight.data.t().contiguous().t()


def _load_tensor(model: DecoderForCausalLM, spec: DecoderSpec, params: dict[str, torch.nn.Parameter], name: str,
                 tensor: torch.Tensor | TensorRef, loaded: set[str]) -> None:
    if "rotary_emb" in name:
        return
    parts = name.split(".")
    proj = parts[-2] if len(parts) >= 2 else ""
    if proj in _STACKED:
        stacked, shard = _STACKED[proj]
        target_name = ".".join(parts[:-2] + [stacked, parts[-1]])
        target = params[target_name]
        if stacked == "qkv_proj":
            q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            offset, size = [(0, q), (q, kv), (q + kv, kv)][shard]
        else:
            size = spec.intermediate_size
            offset = shard * size
        _check_shape(name, tensor, target.data[offset:offset + size].shape, spec)
        _fill(target.data[offset:offset + size], tensor)
        loaded.add(f"{target_name}#{shard}")  # each shard is checked for separately in load_model
        return
    if name not in params:
        if name == "lm_head.weight" and (spec.tie_word_embeddings or spec.head != "lm"):
            return  # tied, or a reward model's unused vocabulary head (vLLM ignores it too)
        raise ValueError(f"unexpected weight {name!r} in checkpoint for architecture {spec.architecture}")
    _check_shape(name, tensor, params[name].shape, spec)
    _fill(params[name].data, tensor)
    loaded.add(name)


def _fill(dest: torch.Tensor, source: torch.Tensor | TensorRef) -> None:
    """dest[...] = source: a tensor already read, or one read from its file straight into dest."""
    if isinstance(source, TensorRef):
        source.copy_into(dest)
    else:
        dest.copy_(source)


def _config_keys(name: str) -> str:
    """The config.json keys that set the shape of weight `name`."""
    if "embed_tokens" in name or "lm_head" in name:
        return "vocab_size, hidden_size"
    if any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "hidden_size, num_attention_heads, num_key_value_heads, head_dim"
    if any(p in name for p in ("gate_proj", "up_proj", "down_proj")):
        return "hidden_size, intermediate_size"
    if "norm" in name:
        return "hidden_size (head_dim for q_norm / k_norm)"
    return "hidden_size"


def _check_shape(name: str, tensor: torch.Tensor, expected: torch.Size, spec: DecoderSpec) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)} in the checkpoint, but config.json "
                         f"implies {tuple(expected)} (from {_config_keys(name)}: vocab_size={spec.vocab_size}, "
                         f"hidden_size={spec.hidden_size}); the weights and config.json disagree")

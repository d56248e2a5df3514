"""Small random-weight checkpoints built locally, for tests, demos and benchmarks (nothing is downloaded).

`build_checkpoint` writes a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files)
for Qwen2, Llama or Qwen3 using transformers' own config and model classes, so transformers is the reference that
loads the very same files. The tokenizer is a byte-level BPE trained here with `tokenizers` on generated text.
`default_model_dir` builds and caches the embedded default (a small Qwen2) under ~/.cache/prmkern.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from typing import Any

import torch

ARCH_CONFIGS = {"qwen2": "Qwen2Config", "llama": "LlamaConfig", "qwen3": "Qwen3Config"}
ARCH_MODELS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The embedded default: Qwen2 architecture, random weights, small enough to run fast on a laptop CPU.
DEFAULT_MODEL = dict(arch="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def _corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Generated math-flavoured text: enough to give a BPE tokenizer sensible merges for numbers and words."""
    rng = random.Random(seed)
    words = ("step the solution is correct incorrect we compute so therefore answer let x y n equals total sum "
             "product each problem verify check yes no because then number of times add subtract multiply divide "
             "fraction remainder integer value first second third final boxed").split()
    ops = ["+", "-", "*", "/", "=", "(", ")", "^", "\\frac", "\\boxed", "{", "}", "$"]
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(5, 20)):
            r = rng.random()
            parts.append(rng.choice(words) if r < 0.6 else rng.choice(ops) if r < 0.8 else str(rng.randint(0, 999)))
        out.append(" ".join(parts))
    return out


def build_tokenizer(path: str, vocab_size: int, extra_special: tuple[str, ...] = ()) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = SPECIAL_TOKENS + list(extra_special)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=special[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def scaled_normal(name: str, x: torch.Tensor, ndim: int, fan_in: int) -> torch.Tensor:
    """Standard normal values x for the weight `name` (of `ndim` dims, `fan_in` = its last dim), at the scale these
    random checkpoints use: norms 1 + 0.1 x, other vectors 0.1 x, matrices x / sqrt(fan_in) (larger than
    transformers' default init, so that logits are not all near-equal)."""
    if "norm" in name:
        return 1.0 + 0.1 * x
    return 0.1 * x if ndim == 1 else x * (1.0 / fan_in ** 0.5)


def build_checkpoint(path: str, arch: str = "qwen2", *, dtype: torch.dtype = torch.float32, seed: int = 0,
                     tokenizer: bool = True, **overrides: Any) -> str:
    """Writes a random-weight checkpoint of `arch` to `path` (config overrides as transformers config kwargs)."""
    import transformers

    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_CONFIGS)}")
    kwargs: dict[str, Any] = dict(vocab_size=512, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                                  tie_word_embeddings=False)
    kwargs.update(overrides)
    config = getattr(transformers, ARCH_CONFIGS[arch])(**kwargs)
    config.architectures = [ARCH_MODELS[arch]]
    config.eos_token_id = 0
    config.bos_token_id = 0
    torch.manual_seed(seed)
    model = getattr(transformers, ARCH_MODELS[arch])(config)
    with torch.no_grad():  # random init with larger scale than the default so logits are not all near-equal
        for name, p in model.named_parameters():
            p.copy_(scaled_normal(name, torch.randn_like(p), p.dim(), p.shape[-1]))
    model.to(dtype).save_pretrained(path)
    if tokenizer:
        build_tokenizer(path, config.vocab_size)
    return path


def build_prm_checkpoint(path: str, *, seed: int = 0, tokenizer: bool = True, **overrides: Any) -> str:
    """A random-weight Qwen2ForProcessRewardModel checkpoint: transformers' Qwen2Model as `model.*` and the score
    head Linear(h, h) -> ReLU -> Linear(h, 2) as `score.0.*` / `score.2.*` (Qwen2.5-Math-PRM's names); the tokenizer
    has the step separator `<extra_0>` as a special token. transformers has no such class, so the head is saved by
    hand; tests rebuild the reference from Qwen2Model + these head tensors."""
    import transformers
    from safetensors.torch import save_file

    from prmkern.models.qwen2_prm import STEP_TAG

    kwargs: dict[str, Any] = dict(vocab_size=512, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                                  tie_word_embeddings=False)
    kwargs.update(overrides)
    config = transformers.Qwen2Config(**kwargs)
    config.architectures = ["Qwen2ForProcessRewardModel"]
    config.eos_token_id = config.bos_token_id = 0
    torch.manual_seed(seed)
    body = transformers.Qwen2Model(config)
    h = config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))
    with torch.no_grad():
        for name, p in list(body.named_parameters()) + list(head.named_parameters()):
            p.copy_(scaled_normal(name, torch.randn_like(p), p.dim(), p.shape[-1]))
    tensors = {f"model.{k}": v.contiguous() for k, v in body.state_dict().items()}
    tensors.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    if tokenizer:
        build_tokenizer(path, config.vocab_size, extra_special=(STEP_TAG,))
    return path


def default_model_dir() -> str:
    """The embedded default checkpoint, built on first use and cached (PRMKERN_CACHE or ~/.cache/prmkern)."""
    root = os.environ.get("PRMKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prmkern"))
    tag = "tiny-qwen2-" + hashlib.sha256(json.dumps(DEFAULT_MODEL, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(root, tag)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root)
        cfg = dict(DEFAULT_MODEL)
        build_checkpoint(tmp, cfg.pop("arch"), **cfg)
        os.replace(tmp, path) if not os.path.exists(path) else None
    return path


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_random_checkpoint(path: str, arch: str = "qwen2", *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            **overrides: Any) -> str:
    """Writes a random-weight checkpoint of `arch` (config.json + one model.safetensors, no tokenizer) without ever
    holding the model in memory: the tensor names and shapes come from transformers' model built on the meta
    device, and each tensor is drawn (build_checkpoint's scales), cast to `dtype` and written a slab of rows at a
    time. For shapes too large for build_checkpoint (a 1.5B model in fp32 would need 7 GB); seconds per GB."""
    import numpy as np
    import transformers

    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_CONFIGS)}")
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {sorted(map(str, _SAFETENSORS_DTYPES))}")
    config = getattr(transformers, ARCH_CONFIGS[arch])(**overrides)
    config.architectures = [ARCH_MODELS[arch]]
    config.eos_token_id = config.bos_token_id = 0
    config.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = getattr(transformers, ARCH_MODELS[arch])(config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()
              if not (n == "lm_head.weight" and config.tie_word_embeddings)}
    esize = torch.finfo(dtype).bits // 8
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = esize * int(np.prod(shape))
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tmp = os.path.join(path, "model.safetensors.partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in shapes.items():
            rows = shape[0] if len(shape) > 1 else 1
            step = max(1, (16 << 20) // max(1, int(np.prod(shape)) // rows))  # ~16M values per slab
            for r in range(0, rows, step):
                slab = shape if len(shape) == 1 else (min(step, rows - r),) + shape[1:]
                x = scaled_normal(name, torch.randn(slab, generator=gen), len(shape), shape[-1])
                f.write(x.to(dtype).view(torch.int16 if esize == 2 else torch.int32).numpy().tobytes())
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    config.save_pretrained(path)
    return path

"""Shared fixtures: small random-weight checkpoints built once per session with transformers' own classes, so the
Hugging Face implementation loads the very same files as the reference."""
from __future__ import annotations

import contextlib
import os

if "TRITON_INTERPRET" not in os.environ:
    # Kernels run on the CPU through Triton's interpreter, which must be chosen before triton is first imported.
    try:
        import torch as _torch
        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest
import torch

from prmkern.tiny import build_checkpoint

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}

# GQA and odd sizes: 6 query heads over 2 KV heads (head dim 16), odd vocab and intermediate sizes.
CHECKPOINTS = {
    "qwen2": dict(arch="qwen2", vocab_size=509, intermediate_size=197),
    "qwen2-tied": dict(arch="qwen2", vocab_size=509, intermediate_size=197, tie_word_embeddings=True),
    "llama3": dict(arch="llama", vocab_size=509, intermediate_size=197, rope_theta=5000.0, rope_scaling=LLAMA3_ROPE),
    "qwen3": dict(arch="qwen3", vocab_size=509, intermediate_size=197, head_dim=24, num_attention_heads=4,
                  num_key_value_heads=1),
}


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, kw in CHECKPOINTS.items():
        kw = dict(kw)
        out[name] = build_checkpoint(str(root / name), kw.pop("arch"), seed=len(out), **kw)
    return out


@pytest.fixture(scope="session")
def qwen2_dir(checkpoint_dirs) -> str:
    return checkpoint_dirs["qwen2"]


def hf_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    return out[0, len(prompt):].tolist()


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def offline(qwen2_dir):
    """The tiny Qwen2 as an offline LLM: what a served result is compared with."""
    from prmkern import LLM
    return LLM(qwen2_dir, device="cpu")


@contextlib.contextmanager
def serve_llm(llm, **config):
    """`llm` behind prmkern's server (ServerConfig(**config)) on a free local port, in a thread; yields its URL."""
    from prmkern.serve.app import ServerConfig, build_app
    from prmkern.serve.background import serve_in_thread
    with serve_in_thread(build_app(llm, ServerConfig(**config))) as url:
        yield url


def openai_client(url: str):
    """The openai package's client for a server at `url`, as a user script would make it (no retries)."""
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prmkern", "data", "verifier")


@pytest.fixture(scope="module")
def shipped_llm():
    """The shipped verifier (prmkern/data/verifier) in float32 on the CPU, with room for many chains' KV."""
    from prmkern import LLM
    return LLM(SHIPPED, device="cpu", dtype="float32", num_kvcache_blocks=2048)


def heldout(n: int | None = None) -> list[dict]:
    """The shipped verifier's held-out examples (its examples.jsonl), the first n when given."""
    import json
    with open(os.path.join(SHIPPED, "examples.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return recs[:n] if n else recs


def stop_token_position(tok, token_ids: list[int]) -> tuple[int, list[str]]:
    """A position >= 2 of greedy output `token_ids` whose token appears there first and adds whole characters to
    the text (so a stop token there changes `text` visibly), and the text of every prefix (skip_special_tokens, the
    output's own rule): texts[i] is the text of token_ids[:i]."""
    texts = [tok.decode(token_ids[:i], skip_special_tokens=True) for i in range(len(token_ids) + 1)]
    pos = next(i for i, t in enumerate(token_ids)
               if i >= 2 and t not in token_ids[:i] and texts[i] != texts[i + 1]
               and not texts[i].endswith("\ufffd") and not texts[i + 1].endswith("\ufffd"))
    return pos, texts

"""LLM: the user-facing facade in vLLM's names. LLM(model).generate(prompts, SamplingParams(...)).

Loads a local Hugging Face checkpoint directory and its tokenizer, owns one engine whose KV cache (and prefix
cache) lives as long as the LLM object, so repeated calls reuse what earlier calls computed.
"""
from __future__ import annotations

import sys
from typing import Sequence as Seq

import torch

from prmkern.config import EngineConfig
from prmkern.engine import LLMEngine
from prmkern.models.loader import read_config, resolve_dtype
from prmkern.outputs import RequestOutput
from prmkern.sampling import SamplingParams
from prmkern.stats import EngineStats


def _load_tokenizer(model: str):
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):
        return None  # token-id prompts still work; text prompts get a clear error


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: str | torch.dtype = "auto",
                 device: str | torch.device | None = None, block_size: int = 16,
                 num_kvcache_blocks: int | None = None, kv_cache_memory: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, attention_backend: str | None = None, seed: int = 0,
                 enforce_eager: bool = False, packed_gemm_bytes: int = 1 << 30, tensor_parallel_size: int = 1):
        hf_config = read_config(model)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.config = EngineConfig(
            model=model, dtype=resolve_dtype(dtype, hf_config), device=torch.device(device), block_size=block_size,
            num_kvcache_blocks=num_kvcache_blocks, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, attention_backend=attention_backend, seed=seed,
            enforce_eager=enforce_eager, packed_gemm_bytes=packed_gemm_bytes)
        self.tokenizer = _load_tokenizer(tokenizer or model)
        if tensor_parallel_size != 1:  # the model split over spawned ranks (prmkern/distributed/, checks the value)
            from prmkern.distributed import TensorParallelEngine
            self.engine = TensorParallelEngine(self.config, self.tokenizer, tensor_parallel_size)
        else:
            self.engine = LLMEngine(self.config, self.tokenizer)

    def close(self) -> None:
        """Stops the tensor-parallel worker processes, if any (also done when the LLM is collected)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def reset_stats(self) -> None:
        self.engine.stats.reset()

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Runs every prompt to completion; returns one RequestOutput per prompt, in order. A prompt that cannot run
        (too long, empty, bad token ids) comes back with `.error` set while the others complete."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                        all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one for all "
                                 f"or one per prompt")
        requests = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        if use_tqdm is None:
            use_tqdm = sys.stderr.isatty()
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc="generate", unit="req", dynamic_ncols=True)
            bar.update(sum(r.finished for r in requests))
        done = {r.request_id for r in requests if r.finished}
        while self.engine.has_unfinished():
            for seq in self.engine.step():
                req = seq.request
                if req.finished and req.request_id not in done:
                    done.add(req.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [self.engine.output(r) for r in requests]

"""LLM: the user-facing facade in vLLM's names and meanings. LLM(model).generate(prompts, SamplingParams(...)),
llm.chat(messages), llm.get_tokenizer(); see docs/api.md for the differences from vLLM.

Loads a local Hugging Face checkpoint directory and its tokenizer, owns one engine whose KV cache (and prefix
cache) lives as long as the LLM object, so repeated calls reuse what earlier calls computed. A call that is
interrupted (KeyboardInterrupt) or fails outside a step aborts its own requests: nothing of it is left to finish in
the next call.
"""
from __future__ import annotations

import numbers
import os
import sys
import warnings
from typing import Any, Sequence as Seq

import torch

from tqdm import tqdm

from prmkern.beam_search import BeamSearchOutput, beam_search
from prmkern.config import EngineConfig
from prmkern.distributed import TensorParallelEngine
from prmkern.engine import driver
from prmkern.engine.engine import LLMEngine
from prmkern.generation_config import sampling_defaults
from prmkern.llm_engine import VLLMEngineView
from prmkern.metrics import Metric
from prmkern.models.loader import read_config, resolve_dtype
from prmkern.outputs import RequestOutput
from prmkern.pooling import PoolingParams, PoolingRequestOutput
from prmkern.sampling_params import BeamSearchParams, SamplingParams
from prmkern.stats import EngineStats
from prmkern.vllm_args import check_vllm_args

# Files that hold a vocabulary; a directory with none of them has no tokenizer, whatever AutoTokenizer builds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken")

Prompt = str | Seq[int] | dict[str, Any]
_D = EngineConfig  # the engine's defaults, written once there (its class attributes are the field defaults)


def load_tokenizer(path: str, explicit: bool, slow: bool = False) -> tuple[Any, str | None]:
    """(tokenizer, None), or (None, why there is none). `explicit` (the user named a tokenizer): failures raise.
    A directory without vocabulary files is reported as missing: AutoTokenizer would build an empty tokenizer
    from the config alone (one special token), which turns every text prompt into an 'empty prompt'."""
    why = None
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        why = f"no tokenizer files in {path} (looked for {', '.join(TOKENIZER_FILES)})"
    else:
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(path, use_fast=not slow)
            if len(tok) > len(set(tok.all_special_ids)):
                return tok, None
            why = f"the tokenizer in {path} has no tokens besides its special tokens"
        except (OSError, ValueError, TypeError) as e:
            why = f"the tokenizer in {path} could not be loaded: {type(e).__name__}: {e}"
    if explicit:
        raise FileNotFoundError(f"tokenizer={path!r}: {why}")
    return None, why


def _is_single_prompt(prompts: Any) -> bool:
    return (isinstance(prompts, (str, dict)) or
            (isinstance(prompts, (list, tuple)) and bool(prompts) and
             all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompts)))


def _prompt_list(prompts: Any) -> list:
    """`prompts` as a list of prompts: one prompt, or a list / tuple of them. Anything else (bytes, an array, a
    tensor, an int, None) is a TypeError naming it: iterating it gave one failed request per element."""
    if _is_single_prompt(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    hint = " (token ids: pass a list of ints, e.g. .tolist())" if hasattr(prompts, "tolist") else ""
    raise TypeError(f"prompts must be a str, a list of int token ids, a TextPrompt {{'prompt': str}} or TokensPrompt "
                    f"{{'prompt_token_ids': [...]}} dict, or a list of those; got {type(prompts).__name__}{hint}")


def _check_arguments(model: Any, tokenizer: Any, seed: Any, tensor_parallel_size: Any) -> None:
    """The LLM arguments that EngineConfig does not hold, checked before anything is read or loaded: the wrong
    type was taken silently (seed="x", tensor_parallel_size=True) or failed late with a message not naming it."""
    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    for name, value in (("model", model), ("tokenizer", tokenizer)):
        if not (isinstance(value, (str, os.PathLike)) or (name == "tokenizer" and value is None)):
            accepted = "a local checkpoint directory (str or path)" + (", or None" if name == "tokenizer" else "")
            raise TypeError(f"{name}={value!r} is invalid ({type(value).__name__}); accepted: {accepted}")
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed={seed!r} is invalid ({type(seed).__name__}); accepted: an int or None (None: 0)")
    if not is_int(tensor_parallel_size) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r} is invalid; accepted: an int >= 1 (not a "
                         f"bool)")


def resolve_device(device: Any) -> torch.device:
    """`device` as a torch.device: None or "auto" (vLLM's) is cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is invalid; accepted: None or 'auto' (cuda when available), 'cpu', "
                         f"'cuda', 'cuda:N' or a torch.device ({e})") from None


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: str | torch.dtype = "auto",
                 device: str | torch.device | None = None, block_size: int = _D.block_size,
                 num_kvcache_blocks: int | None = _D.num_kvcache_blocks, kv_cache_memory: int | None = _D.kv_cache_memory,
                 max_num_seqs: int = _D.max_num_seqs, max_num_batched_tokens: int = _D.max_num_batched_tokens,
                 max_model_len: int | None = _D.max_model_len, enable_prefix_caching: bool = _D.enable_prefix_caching,
                 attention_backend: str | None = _D.attention_backend, seed: int | None = _D.seed,
                 enforce_eager: bool = _D.enforce_eager, max_graph_batch: int = _D.max_graph_batch,
                 packed_gemm_bytes: int = _D.packed_gemm_bytes,
                 gpu_memory_utilization: float | None = _D.gpu_memory_utilization, tensor_parallel_size: int = 1,
                 **vllm_kwargs: Any):
        """prmkern's arguments, plus vLLM's: gpu_memory_utilization (CUDA: the fraction of the device's total memory
        this process may fill, the KV pool taking what the weights leave; CPU: ignored with a warning, the pool
        is kv_cache_memory), and the vLLM-only arguments of prmkern/vllm_args.py (trust_remote_code,
        swap_space, disable_log_stats, ...: accepted, ignored with a warning, or rejected
        with an error naming what is supported)."""
        if "kv_cache_memory_bytes" in vllm_kwargs:  # vLLM's name for prmkern's kv_cache_memory
            kv_cache_memory = vllm_kwargs.pop("kv_cache_memory_bytes")
        _check_arguments(model=model, tokenizer=tokenizer, seed=seed, tensor_parallel_size=tensor_parallel_size)
        used = check_vllm_args(vllm_kwargs)
        hf_config = read_config(model)
        device = resolve_device(device)
        if gpu_memory_utilization is not None and (
                not isinstance(gpu_memory_utilization, (int, float)) or isinstance(gpu_memory_utilization, bool)
                or not 0 < gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r} is invalid; accepted: a float in "
                             f"(0, 1] (vLLM's meaning: the fraction of the GPU's memory this process may use)")
        if gpu_memory_utilization is not None and device.type != "cuda":
            warnings.warn(f"prmkern: gpu_memory_utilization={gpu_memory_utilization!r} is ignored on {device.type}: "
                          f"the KV pool there is kv_cache_memory bytes (default: 40% of available memory, at least 1 GiB)", stacklevel=2)
            gpu_memory_utilization = None
        self.config = EngineConfig(
            model=model, dtype=resolve_dtype(dtype, hf_config), device=device, block_size=block_size,
            num_kvcache_blocks=num_kvcache_blocks, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, attention_backend=attention_backend,
            seed=_D.seed if seed is None else seed, enforce_eager=enforce_eager, max_graph_batch=max_graph_batch,
            packed_gemm_bytes=packed_gemm_bytes, gpu_memory_utilization=gpu_memory_utilization)
        self._engine_view: VLLMEngineView | None = None
        self._generation_config = used.get("generation_config", "auto")
        self._sampling_defaults = sampling_defaults(model, self._generation_config)  # checked before loading
        if used.get("skip_tokenizer_init"):
            self.tokenizer, missing = None, "skip_tokenizer_init=True"
        else:
            self.tokenizer, missing = load_tokenizer(tokenizer or model, explicit=tokenizer is not None,
                                                     slow=used.get("tokenizer_mode") == "slow")
            if missing is not None:
                warnings.warn(f"prmkern: {missing}; only token-id prompts will work", stacklevel=2)
        if tensor_parallel_size != 1 and "Qwen2ForProcessRewardModel" in (hf_config.get("architectures") or []):
            raise ValueError("tensor_parallel_size > 1 is not supported for process reward models "
                             "(Qwen2ForProcessRewardModel); use tensor_parallel_size=1")
        if tensor_parallel_size != 1:  # the model split over spawned ranks (prmkern/distributed/ checks the value)
            self.engine = TensorParallelEngine(self.config, self.tokenizer, tensor_parallel_size)
            self.engine.tokenizer_missing = missing or self.engine.tokenizer_missing
        else:
            self.engine = LLMEngine(self.config, self.tokenizer, tokenizer_missing=missing)

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
    def llm_engine(self) -> VLLMEngineView:
        """vLLM's LLMEngine surface over this LLM's engine: add_request(request_id, prompt, params), step() ->
        RequestOutputs, has_unfinished_requests(), abort_request(ids) (prmkern/llm_engine.py). `llm.engine` is
        prmkern's own engine object."""
        if self._engine_view is None:
            self._engine_view = VLLMEngineView(self.engine)
        return self._engine_view

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the checkpoint's generation_config.json defaults (temperature, top_p, top_k,
        min_p, repetition_penalty, max_new_tokens as max_tokens; prmkern/generation_config.py), else
        SamplingParams(). generate() and chat() use it when no sampling_params are given."""
        return SamplingParams(**self._sampling_defaults)

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forgets the prefix cache, so the next prompts are computed from scratch. False (nothing reset)
        while requests hold KV blocks."""
        return self.engine.block_manager.reset_prefix_cache()

    def get_metrics(self) -> list[Metric]:
        """vLLM's: the engine's metrics as reader objects (prmkern/metrics.py: Counter, Gauge, Histogram with name,
        labels and values), vLLM's names under the `prmkern:` prefix."""
        return self.engine.metrics.snapshot(self.engine)

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def reset_stats(self) -> None:
        self.engine.stats.reset()

    def get_tokenizer(self):
        """The Hugging Face tokenizer (None when the checkpoint has none or skip_tokenizer_init was set)."""
        return self.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | None = None, lora_request: Any = None,
                 watch: Any = None) -> list[RequestOutput]:
        """Runs every prompt to completion; returns one RequestOutput per prompt, in order. A prompt is a string, a
        list of token ids, or a TextPrompt {"prompt": ...} / TokensPrompt {"prompt_token_ids": [...]} dict. A prompt
        that cannot run (too long, empty, bad token ids or keys) comes back with `.error` set while the others
        complete; so does a request whose step failed.
        watch (prmkern): called after every engine step as watch(i, chains) for each unfinished prompt i, with its
        chains as they stand (the engine's Sequences); True aborts that prompt's request: its unfinished chains end
        with finish_reason "abort" and their blocks are freed, the other prompts go on (stop at the first error)."""
        if lora_request is not None:
            raise NotImplementedError("lora_request is not supported: merge the adapter into the weights")
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, (dict, str)):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got a "
                            f"{type(sampling_params).__name__} (build one with SamplingParams(**d))")
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one for all "
                                 f"or one per prompt")
        return self._generate(prompts, params, sys.stderr.isatty() if use_tqdm is None else bool(use_tqdm), watch)

    def encode(self, prompts: Prompt | Seq[Prompt], pooling_params: PoolingParams | Seq[PoolingParams] | None = None,
               use_tqdm: bool | None = None, lora_request: Any = None) -> list[PoolingRequestOutput]:
        """vLLM's encode() for a pooling model (Qwen2ForProcessRewardModel): one PoolingRequestOutput per prompt,
        in order, its `outputs.data` the model's pooled rows (prmkern/pooling.py: softmax of the head at each
        `<extra_0>`, [num_steps, 2]). Prompts as in generate(); one that cannot run comes back with `.error` set.
        Prompts sharing a prefix (one problem, several solutions) compute it once (prefix cache)."""
        if lora_request is not None:
            raise NotImplementedError("lora_request is not supported: merge the adapter into the weights")
        prompts = _prompt_list(prompts)
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, PoolingParams):
            params = [pooling_params] * len(prompts)
        else:
            params = list(pooling_params)
            if len(params) != len(prompts) or not all(isinstance(p, PoolingParams) for p in params):
                raise ValueError(f"pooling_params must be one PoolingParams or one per prompt ({len(prompts)}); "
                                 f"got {type(pooling_params).__name__} of {len(params)}")
        if not self.engine.is_pooling_model:
            raise ValueError(f"encode()/reward() need a pooling model (architecture Qwen2ForProcessRewardModel); "
                             f"{self.config.model} is a {self.engine.model.spec.architecture} model: use generate()")
        return driver.encode(self.engine, prompts, params)  # the step loop generate() runs

    def reward(self, prompts: Prompt | Seq[Prompt], pooling_params: PoolingParams | Seq[PoolingParams] | None = None,
               use_tqdm: bool | None = None, lora_request: Any = None) -> list[PoolingRequestOutput]:
        """vLLM's reward(): encode() with the model's reward pooler (for a PRM: P(incorrect), P(correct) at each
        step separator)."""
        return self.encode(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def _generate(self, prompts: list, params: list[SamplingParams], use_tqdm: bool,
                  watch: Any = None) -> list[RequestOutput]:
        """The step loop (prmkern/engine/driver.py), with a progress bar of finished requests as its callback."""
        if not use_tqdm:
            return driver.generate(self.engine, prompts, params, watch=watch)
        bar = tqdm(total=len(prompts), desc="generate", unit="req", dynamic_ncols=True)
        done: set = set()

        def on_step(finished: list) -> None:
            for seq in finished:
                req = seq.request
                if req.finished and req.request_id not in done:
                    done.add(req.request_id)
                    bar.update(1)
        try:
            outputs = driver.generate(self.engine, prompts, params, on_step, watch)
            bar.update(len(prompts) - bar.n)  # the prompts that failed before any step (too long, empty, ...)
            return outputs
        finally:
            bar.close()

    def beam_search(self, prompts: Prompt | Seq[Prompt], params: BeamSearchParams, lora_request: Any = None,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's beam search: one BeamSearchOutput per prompt, its `sequences` the best beam_width beams (tokens:
        prompt + generated, text, cum_logprob), ranked by cumulative log-probability over length ** length_penalty
        (prmkern/beam_search.py states the rule). concurrency_limit: prompts searched at a time (None: all)."""
        if lora_request is not None:
            raise NotImplementedError("lora_request is not supported: merge the adapter into the weights")
        return beam_search(self, prompts, params, use_tqdm=use_tqdm, concurrency_limit=concurrency_limit)

    def chat(self, messages: Seq[dict[str, Any]] | Seq[Seq[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None, lora_request: Any = None) -> list[RequestOutput]:
        """vLLM's chat(): one conversation (a list of {"role", "content"} dicts) or a list of them, rendered by the
        tokenizer's chat template (or `chat_template`) and generated; one RequestOutput per conversation."""
        if self.tokenizer is None:
            raise ValueError(f"chat() needs a tokenizer with a chat template: {self.engine.tokenizer_missing}")
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; pass chat_template=<a Jinja template>")
        prompts = []
        for conv in conversations:
            if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
                raise TypeError(f"a conversation must be a list of message dicts, got {type(conv).__name__}")
            text = self.tokenizer.apply_chat_template(
                list(conv), tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=chat_template, tools=tools,
                **(chat_template_kwargs or {}))
            prompts.append({"prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

"""LLMEngine: the step loop. schedule -> run -> sample -> postprocess (fork, append, stop checks, free).

Validates each request on arrival; a bad request is failed alone with an error message and never reaches the
scheduler. A failure inside a step fails the requests it can be attributed to (a row with non-finite logits: that
request; the forward pass: the requests in that step), frees their blocks and leaves the engine usable.
Tokenizes text prompts (bounded) and, for stop strings, detokenizes new tokens incrementally.
"""
from __future__ import annotations

import random
import time

import torch

from prmkern.attention import backend_class
from prmkern.engine import prompt_scores
from prmkern.engine.block_manager import BlockManager
from prmkern.config import EngineConfig
from prmkern.models import load_model
from prmkern.ops.cpp import cpp_ops
from prmkern.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from prmkern.pooling import (PoolingParams, PoolingRequestOutput, default_step_tag_id, pooled_positions,
                             pooling_output, record_rows)
from prmkern.prompts import MissingTokenizerError, encode_bounded, max_token_chars, split_prompt
from prmkern.engine.runner import ModelRunner, kv_block_bytes
from prmkern.engine.sampler import PositionLogprobs, Sampler
from prmkern.sampling_params import SEED_BITS, SamplingParams, derive_seed
from prmkern.engine.scheduler import Scheduler
from prmkern.engine.sequence import Request, Sequence, SequenceStatus
from prmkern.metrics import EngineMetrics
from prmkern.stats import EngineStats

# CPU KV pool: this fraction of the memory available when the engine starts (after loading the weights), at least
# CPU_KV_CACHE_BYTES (also the size when the available memory cannot be read). The pool is allocated uninitialised
# on the CPU (prmkern/engine/runner.py): pages are committed as blocks are first written, and since freed blocks are
# reused least-recently-freed first (prefix caching), the resident size grows towards the pool size with use.
CPU_KV_CACHE_BYTES = 1 << 30
CPU_KV_CACHE_FRACTION = 0.4


def cpu_kv_cache_budget(available: int | None) -> int:
    """Bytes for the CPU KV pool when none is given: CPU_KV_CACHE_FRACTION of `available` (MemAvailable after the
    weights are loaded), at least CPU_KV_CACHE_BYTES, which is also the budget when it cannot be read."""
    if not available:
        return CPU_KV_CACHE_BYTES
    return max(CPU_KV_CACHE_BYTES, int(available * CPU_KV_CACHE_FRACTION))


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class FatalEngineError(RuntimeError):
    """The engine cannot run any further step (e.g. a tensor-parallel rank died). Raised to the caller instead of
    failing only the step's requests, which is what any other exception inside a step does."""


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None, tokenizer_missing: str | None = None):
        """tokenizer_missing: why there is no tokenizer (reported to text prompts and stop strings)."""
        self.config = config
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}  # token id -> its text, for logprob dicts (_token_text)
        self.tokenizer_missing = tokenizer_missing or "this checkpoint has no tokenizer"
        self._max_token_chars: int | None = None
        self.model = self._load_model()
        spec = self.model.spec
        if config.max_model_len is not None and config.max_model_len > spec.max_position_embeddings:
            # vLLM raises here too (its VLLM_ALLOW_LONG_MAX_MODEL_LEN override has no equivalent: the rotary
            # tables end at the model's limit)
            raise ValueError(f"User-specified max_model_len ({config.max_model_len}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={spec.max_position_embeddings} in the model's "
                             f"config.json); accepted: max_model_len <= {spec.max_position_embeddings}, or None")
        self.max_model_len = config.max_model_len or spec.max_position_embeddings
        self.num_blocks = self._num_blocks()
        self.stats = EngineStats()
        self.metrics = EngineMetrics(config.model)  # vLLM's metrics (prmkern/metrics.py); the server renames it
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.stats)
        self.runner = self._make_runner()
        eos = spec.eos_token_ids
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = (tokenizer.eos_token_id,)
        self.eos_token_ids = tuple(eos)
        # A backend on the C++ CPU kernels lends them to the sampler's draw too (csrc/sampling.cpp); the torch
        # backend stays all torch.
        cpu_kernels = cpp_ops() if backend_class(config.attention_backend).cpu_kernels and \
            config.device.type == "cpu" else None
        self.sampler = Sampler(self.eos_token_ids, cpu_kernels)
        self.rng = random.Random(config.seed)
        self.next_seq_id = 0
        self.next_request_id = 0
        self.requests: dict[str, Request] = {}  # unfinished requests by id (abort_request looks them up here)
        # Pooling models: the token whose positions are pooled by default (<extra_0> for Qwen2.5-Math-PRM).
        self.step_tag_id = default_step_tag_id(tokenizer, spec.vocab_size) if spec.head != "lm" else None

    def _load_model(self):
        return load_model(self.config.model, self.config.dtype, self.config.device)

    def _make_runner(self) -> ModelRunner:
        # overridden by the tensor-parallel engine (prmkern/distributed/tp_engine.py), whose model lives in its ranks
        return ModelRunner(self.config, self.model, self.num_blocks, self.block_manager, self.max_model_len)

    def _num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kvcache_blocks is not None:
            return cfg.num_kvcache_blocks
        budget = cfg.kv_cache_memory
        if budget is None:
            if cfg.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(cfg.device)
                if cfg.gpu_memory_utilization is None:
                    budget = int(free * 0.9)
                else:  # what this process may fill, less what is in use now (weights and anything else)
                    budget = int(total * cfg.gpu_memory_utilization) - (total - free)
                    if budget <= 0:
                        raise ValueError(f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves no memory for "
                                         f"the KV pool: {total - free} of {total} bytes are in use after loading")
            else:
                budget = cpu_kv_cache_budget(available_memory_bytes())
        num = budget // kv_block_bytes(self.model, cfg.block_size, cfg.dtype)
        if num < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes holds no block of "
                             f"{kv_block_bytes(self.model, cfg.block_size, cfg.dtype)} bytes")
        # More blocks than every running sequence at full context can use would only cost memory.
        return int(min(num, cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)))

    # -- requests -------------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | dict, params: SamplingParams | None,
                    request_id: str | None = None, pooling: PoolingParams | None = None) -> Request:
        """Queues a prompt (text, token ids, or a TextPrompt / TokensPrompt dict); returns its Request (failed at
        once, with .error set, when the prompt or the params are invalid). request_id: a str unique among unfinished
        requests (default: a counter, as a str). pooling: a pooling request (a reward model's rows, no sampling;
        `params` is ignored)."""
        if request_id is None:
            request_id = str(self.next_request_id)
            self.next_request_id += 1
        elif not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        text, token_ids, error = None, [], None
        try:
            text, ids = split_prompt(prompt)
            token_ids = self._prompt_token_ids(text, ids)
            if pooling is not None or self.is_pooling_model:
                params = self._check_pooling(pooling)
            self._check_params(params)
            prompt_scores.check_rows(params, len(token_ids), self.model.spec.vocab_size)
            bad_words = self._bad_words_token_ids(params)
        except (TypeError, ValueError) as e:
            error = str(e)
        except Exception as e:  # e.g. the tokenizer failing on this text: this request fails, nothing else
            error = f"the prompt could not be prepared: {type(e).__name__}: {e}"
        # A failed request keeps its params only when they are SamplingParams (outputs read them); anything else
        # (a dict in a list of params) is what the error names.
        kept = params if isinstance(params, SamplingParams) else SamplingParams()
        request = Request(request_id, text, token_ids, kept, error=error, pooling=pooling)
        if error is None:
            request.bad_words_token_ids = bad_words
        else:
            request.finished_time = request.arrival_time
        if pooling is not None and error is None:
            tag = self.step_tag_id if pooling.step_tag_id is None else pooling.step_tag_id
            request.pool_positions = pooled_positions(token_ids, tag, pooling.first_position)
            request.pool_next = request.pool_positions[0] if request.pool_positions else len(token_ids)
        self.stats.requests += 1
        if error is not None:
            self.stats.failed_requests += 1
            return request
        self.stats.prompt_tokens += len(token_ids)
        self.requests[request_id] = request
        # One sequence; with n > 1 it is forked into n chains once its prompt is prefilled.
        request.seqs.append(Sequence(self._take_seq_id(), request, 0, self._generator(request, 0)))
        self.scheduler.add(request.seqs[0])
        return request

    @property
    def is_pooling_model(self) -> bool:
        return self.model.spec.head != "lm"

    def _check_pooling(self, pooling: PoolingParams | None) -> SamplingParams:
        """The internal params of a pooling request (its prompt is prefilled, nothing is sampled)."""
        if not self.is_pooling_model:
            raise ValueError(f"pooling needs a pooling model (architecture Qwen2ForProcessRewardModel); this "
                             f"checkpoint ({self.model.spec.architecture}) generates: use generate()")
        if pooling is None:
            raise ValueError(f"this checkpoint ({self.model.spec.architecture}) is a process reward model: it "
                             f"scores prompts and does not generate; use LLM.reward() / LLM.encode()")
        if not isinstance(pooling, PoolingParams):
            raise TypeError(f"pooling params must be a PoolingParams, got {type(pooling).__name__}")
        pooling.__post_init__()
        bad = [i for i in pooling.returned_token_ids or [] if i >= self.model.spec.num_labels]
        if bad:
            raise ValueError(f"PoolingParams.returned_token_ids has {bad}, outside this head's "
                             f"{self.model.spec.num_labels} columns")
        return SamplingParams(max_tokens=1)

    def _check_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.__post_init__()  # again: fields may have been set after construction (idempotent)
        if params.n > max(self.num_blocks, self.config.max_num_seqs):
            # Every chain needs a KV block of its own from its first generated token: more could never run.
            raise ValueError(f"SamplingParams.n={params.n} exceeds what this engine can run: at most "
                             f"{max(self.num_blocks, self.config.max_num_seqs)} chains (the KV pool has "
                             f"{self.num_blocks} blocks); split the request or enlarge the pool")
        vocab = self.model.spec.vocab_size
        for name in ("stop_token_ids", "logprob_token_ids", "allowed_token_ids", "logit_bias"):
            bad = [t for t in getattr(params, name) or [] if t >= vocab]
            if bad:
                raise ValueError(f"SamplingParams.{name} has ids {bad[:5]} outside this model's vocabulary "
                                 f"[0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"SamplingParams.{name}={k} exceeds this model's vocabulary of {vocab} tokens")
        if params.stop_strings and self.tokenizer is None:
            raise MissingTokenizerError(f"stop strings need a tokenizer: {self.tokenizer_missing}; use "
                                        f"stop_token_ids")

    def _bad_words_token_ids(self, params: SamplingParams) -> list[list[int]] | None:
        """vLLM's tokenization of bad_words: each word (leading spaces stripped) as is, and with one leading space
        when that gives a different first token and as many tokens."""
        if not params.bad_words:
            return None
        if self.tokenizer is None:
            raise MissingTokenizerError(f"bad_words need a tokenizer: {self.tokenizer_missing}; use logit_bias")
        words: list[list[int]] = []
        for word in params.bad_words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            words.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                words.append(spaced)
        vocab = self.model.spec.vocab_size
        if any(t >= vocab for w in words for t in w):
            raise ValueError(f"SamplingParams.bad_words tokenize to ids outside this model's vocabulary [0, {vocab})")
        return words

    def _prompt_token_ids(self, text: str | None, ids: list[int] | None) -> list[int]:
        if ids is not None:
            token_ids = ids
        else:
            if self.tokenizer is None:
                raise MissingTokenizerError(f"a text prompt needs a tokenizer: {self.tokenizer_missing}; pass "
                                            f"token ids or LLM(..., tokenizer=DIR)")
            if self._max_token_chars is None:
                self._max_token_chars = max_token_chars(self.tokenizer)
            token_ids = encode_bounded(self.tokenizer, text, self.max_model_len - 1, self._max_token_chars)
        vocab = self.model.spec.vocab_size
        if not token_ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if any(t < 0 or t >= vocab for t in token_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {min(token_ids)}..{max(token_ids)}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens but the model's context (max_model_len) is "
                             f"{self.max_model_len}: at most {self.max_model_len - 1} prompt tokens are accepted")
        need = -(-(len(token_ids) + 1) // self.config.block_size)
        if need > self.num_blocks:
            raise ValueError(f"prompt needs {need} KV blocks but the pool has {self.num_blocks}; "
                             f"raise num_kvcache_blocks or kv_cache_memory")
        return token_ids

    def _take_seq_id(self) -> int:
        self.next_seq_id += 1
        return self.next_seq_id - 1

    def _generator(self, request: Request, chain_index: int) -> torch.Generator:
        """Chain `chain_index`'s own RNG: from the request's seed when given (chain first_chain + chain_index of
        the seeded whole), else from the engine's seeded RNG."""
        seed = request.params.seed
        if seed is None:
            seed = self.rng.randrange(1 << SEED_BITS)
        else:
            seed = derive_seed(seed, request.params.first_chain + chain_index)
        return torch.Generator().manual_seed(seed)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def abort_request(self, request: Request | str) -> bool:
        """Stops a request (a Request or its id) wherever it is: its sequences leave the scheduler, their blocks are
        freed (computed prompt blocks stay in the prefix cache) and each unfinished chain ends with finish_reason
        "abort". Returns False if the request was unknown or already finished. Call between steps."""
        if isinstance(request, str):
            request = self.requests.get(request)
            if request is None:
                return False
        self.requests.pop(request.request_id, None)
        if request.finished:
            return False
        request.aborted = True
        self.stats.aborted_requests += 1
        self._end_chains(request, "abort")
        request.finished_time = time.time()
        self.metrics.request_finished(request)
        return True

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that finished in it (including those of requests that failed)."""
        step = self.scheduler.schedule()
        early, self.scheduler.finished_early = self.scheduler.finished_early, []
        if step is None:
            if early:
                return self._forget_finished(early)
            if self.scheduler.has_work():  # cannot happen by design; if it does, fail what is stuck, stay usable
                stuck = {seq.request for seq in list(self.scheduler.waiting) + self.scheduler.running}
                return self._forget_finished(self._fail_requests(
                    stuck, "scheduler made no progress: the KV pool cannot hold one running sequence; pool has "
                           f"{self.num_blocks} blocks of {self.config.block_size} tokens"))
            return []
        try:
            logits = self.runner.run(step)
        except FatalEngineError:  # the engine itself is gone (e.g. a tensor-parallel rank died): nothing to retry
            raise
        except Exception as e:  # not attributable to one row: every request in this step fails, the rest go on
            failed = self._fail_requests({item.seq.request for item in step.scheduled},
                                         f"the forward pass failed: {type(e).__name__}: {e}")
            return self._forget_finished(early + failed)
        if step.is_prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += sum(item.num_new for item in step.scheduled)
        else:
            self.stats.decode_steps += 1
        sampling: list[Sequence] = []
        rows: list[int] = []
        row = 0
        now = time.time()
        for item in step.scheduled:
            seq = item.seq
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
            seq.num_computed_tokens = item.end
            self.block_manager.mark_computed(seq, item.start)
            n_rows = item.num_logit_rows
            pooling = seq.request.pooling is not None
            if item.logits_from is not None and pooling:
                record_rows(seq.request, item.logits_from, logits[row:row + item.end - item.logits_from])
            elif item.logits_from is not None:
                prompt_rows = min(item.end, seq.num_prompt_tokens - 1) - item.logits_from
                if prompt_rows > 0:
                    prompt_scores.record(seq.request, item.logits_from, logits[row:row + prompt_rows])
            if item.samples and pooling:  # prefilled: a pooling request is done, nothing is sampled
                seq.finish_reason = "stop"
                self.scheduler.finish(seq)
                early.append(seq)
            elif item.samples:
                family = [seq] + (self._fork(seq) if seq.needs_fork else [])
                sampling.extend(family)
                rows.extend([row + n_rows - 1] * len(family))
            row += n_rows
        if not sampling:
            return self._forget_finished(early)
        if rows != list(range(logits.shape[0])):
            logits = logits[torch.tensor(rows, device=logits.device)]
        finished = early
        try:
            result = self.sampler(logits, sampling)
        except Exception as e:
            failed = self._fail_requests({seq.request for seq in sampling},
                                         f"sampling failed: {type(e).__name__}: {e}")
            return self._forget_finished(finished + failed)
        for r, why in result.failed.items():
            finished += self._fail_requests({sampling[r].request}, why)
        for i, seq in enumerate(sampling):
            if seq.status is SequenceStatus.FINISHED:
                continue  # its request failed in this step
            try:
                done = self._append(seq, result.token_ids[i], result.logprobs[i], result.chosen_logprobs[i])
            except Exception as e:
                finished += self._fail_requests({seq.request}, f"postprocessing failed: {type(e).__name__}: {e}")
                continue
            if done:
                self.scheduler.finish(seq)
                finished.append(seq)
        return self._forget_finished(finished)

    def _fail_requests(self, requests: set[Request], error: str) -> list[Sequence]:
        """Fails each request: its unfinished chains leave the scheduler (blocks freed) with finish_reason "error";
        returns them."""
        ended = []
        for request in sorted(requests, key=lambda r: r.request_id):
            if request.finished:
                continue
            request.error = error
            self.stats.failed_requests += 1
            ended += self._end_chains(request, "error")
        return ended

    def _end_chains(self, request: Request, reason: str) -> list[Sequence]:
        """Takes the request's unfinished chains out of the scheduler (their blocks freed) with finish_reason
        `reason`; returns them."""
        ended = [seq for seq in request.seqs if seq.status is not SequenceStatus.FINISHED]
        for seq in ended:
            self.scheduler.abort(seq)
            seq.finish_reason = reason
        return ended

    def _forget_finished(self, finished: list[Sequence]) -> list[Sequence]:
        now = time.time()
        for seq in finished:
            if seq.request.finished:
                if seq.request.finished_time is None:
                    seq.request.finished_time = now
                    self.metrics.request_finished(seq.request)
                self.requests.pop(seq.request.request_id, None)
        return finished

    def _fork(self, parent: Sequence) -> list[Sequence]:
        parent.needs_fork = False
        children = []
        for i in range(1, parent.params.n):
            child = parent.fork(self._take_seq_id(), i, self._generator(parent.request, i))
            self.block_manager.fork(parent, child)
            self.scheduler.running.append(child)
            parent.request.seqs.append(child)
            children.append(child)
        return children

    def _append(self, seq: Sequence, token: int, logprob: PositionLogprobs | None,
                chosen: dict[int, float] | None) -> bool:
        """Appends a sampled token; returns True when the sequence is finished."""
        p = seq.params
        seq.token_ids.append(token)
        self.stats.generated_tokens += 1
        request = seq.request
        now = time.time()
        if seq.last_token_time is not None:
            self.metrics.observe("inter_token_latency_seconds", now - seq.last_token_time)
        seq.last_token_time = request.last_token_time = now
        if request.first_token_time is None:
            request.first_token_time = now
        request.num_generation_tokens += 1
        if p.logprobs is not None or p.logprob_token_ids:
            seq.logprobs.append(logprob)
        if p.logprob_token_ids:
            seq.token_logprobs.append(chosen)
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:  # the sampler banned these before: the (min_tokens + 1)-th token may be one
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
                return True
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return True
        if p.stop_strings:
            # vLLM's rule: a stop string may end only in the text of tokens past the first min_tokens
            if n_out > p.min_tokens:
                if self._check_stop_strings(seq):
                    return True
            else:
                self._detokenize(seq)
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _detokenize(self, seq: Sequence) -> str:
        """Adds the text of newly sampled tokens to seq.text (decoding only a short window); returns the new text."""
        ids = seq.token_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset],
                                       skip_special_tokens=seq.params.skip_special_tokens)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=seq.params.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            seq.text += new
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return new
        return ""

    def _check_stop_strings(self, seq: Sequence) -> bool:
        new = self._detokenize(seq)
        if not new:
            return False
        p = seq.params
        # each stop string ends in the new text (it may start before it), as vLLM's check_stop_strings
        hits = [(seq.text.find(s, max(0, len(seq.text) - len(new) - len(s) + 1)), s) for s in p.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text = seq.text[:index + (len(stop) if p.include_stop_str_in_output else 0)]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    # -- outputs --------------------------------------------------------------------------------------------------
    def _logprob_dict(self, pos: PositionLogprobs) -> dict[int, Logprob]:
        """vLLM's per-position dict: the chosen token first, then the top k (ranks 1..k) where not the chosen one."""
        decode = self._token_text if self.tokenizer is not None else (lambda t: None)
        out = {pos.token_id: Logprob(pos.logprob, pos.rank, decode(pos.token_id))}
        for rank, (t, lp) in enumerate(zip(pos.top_ids, pos.top_logprobs), start=1):
            if t not in out:
                out[t] = Logprob(lp, rank, decode(t))
        for t, (lp, rank) in pos.extra.items():  # logprob_token_ids
            if t not in out:
                out[t] = Logprob(lp, rank, decode(t))
        return out

    def _token_text(self, token_id: int) -> str:
        """One token's text, cached (bounded by the vocabulary): prompt_logprobs=k decodes k+1 tokens per prompt
        position, and decoding each again held the engine loop (3 s for k=20 over 944 positions)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def pooling_output(self, request: Request) -> PoolingRequestOutput:
        """A pooling request's PoolingRequestOutput (rows complete once request.finished)."""
        return pooling_output(request, self.model.spec.num_labels)

    def output(self, request: Request) -> RequestOutput:
        """The request's RequestOutput as it stands (complete once request.finished)."""
        prompt_lps = None
        if request.params.prompt_logprobs is not None and request.error is None:
            prompt_lps = [None if pos is None else self._logprob_dict(pos) for pos in request.prompt_logprobs]
        outs = []
        for seq in sorted(request.seqs, key=lambda s: s.chain_index):
            p = seq.params
            if p.stop_strings and seq.stop_reason in p.stop_strings:
                text = seq.text
            elif self.tokenizer is not None and p.detokenize:
                # vLLM's text: its incremental detokenizer never emits a trailing incomplete UTF-8 character (a
                # chain cut by max_tokens inside one ends before it, as streamed text does), nor the text of the
                # stop token that ended the chain
                text = self.tokenizer.decode(seq.text_token_ids,
                                             skip_special_tokens=p.skip_special_tokens).rstrip("\ufffd")
            else:
                text = ""
            want = p.logprobs is not None or bool(p.logprob_token_ids)
            lps = [self._logprob_dict(pos) for pos in seq.logprobs] if want else None
            outs.append(CompletionOutput(
                index=seq.chain_index, text=text, token_ids=seq.output_token_ids,
                cumulative_logprob=float(sum(pos.logprob for pos in seq.logprobs)) if want else None,
                logprobs=lps, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                token_logprobs=list(seq.token_logprobs) if p.logprob_token_ids else None,
                kv_pool_exhausted=seq.kv_pool_exhausted))
        if request.finished and request.finished_time is None:
            request.finished_time = time.time()
        metrics = RequestMetrics(request.arrival_time, request.first_scheduled_time, request.first_token_time,
                                 request.last_token_time, request.finished_time, request.num_generation_tokens)
        out = RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs, request.finished,
                            request.error, prompt_lps, request.num_cached_tokens or 0, metrics)
        if request.prompt_id_scores is not None and request.error is None:
            out.prompt_token_id_logprobs = request.prompt_id_scores.numpy().copy()
        return out

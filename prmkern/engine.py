"""LLMEngine: the step loop. schedule -> run -> sample -> postprocess (fork, append, stop checks, free).

Validates each request on arrival; a bad request is failed alone with an error message and never reaches the
scheduler. Tokenizes nothing except for stop-string detection (incremental detokenisation of new tokens only).
"""
from __future__ import annotations

import random

import torch

from prmkern.block_manager import BlockManager
from prmkern.config import EngineConfig
from prmkern.models import load_model
from prmkern.outputs import CompletionOutput, RequestOutput
from prmkern.runner import ModelRunner, kv_block_bytes
from prmkern.sampler import Sampler
from prmkern.sampling import SamplingParams
from prmkern.scheduler import Scheduler
from prmkern.sequence import Request, Sequence, SequenceStatus
from prmkern.stats import EngineStats

# CPU KV pool: this fraction of the memory available when the engine starts (after loading the weights), at least
# CPU_KV_CACHE_BYTES (also the size when the available memory cannot be read). The pool is allocated uninitialised
# on the CPU (prmkern/runner.py): pages are committed as blocks are first written, and since freed blocks are
# reused least-recently-freed first (prefix caching), the resident size grows towards the pool size with use.
CPU_KV_CACHE_BYTES = 1 << 30
CPU_KV_CACHE_FRACTION = 0.4


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


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self.model = load_model(config.model, config.dtype, config.device)
        spec = self.model.spec
        self.max_model_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        self.num_blocks = self._num_blocks()
        self.stats = EngineStats()
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.stats)
        self.runner = ModelRunner(config, self.model, self.num_blocks, self.block_manager, self.max_model_len)
        eos = spec.eos_token_ids
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = (tokenizer.eos_token_id,)
        self.eos_token_ids = tuple(eos)
        self.sampler = Sampler(self.eos_token_ids)
        self.rng = random.Random(config.seed)
        self.next_seq_id = 0
        self.next_request_id = 0

    def _num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kvcache_blocks is not None:
            return cfg.num_kvcache_blocks
        budget = cfg.kv_cache_memory
        if budget is None:
            if cfg.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(cfg.device)
                budget = int(free * 0.9)
            else:
                avail = available_memory_bytes()
                budget = max(CPU_KV_CACHE_BYTES, int(avail * CPU_KV_CACHE_FRACTION)) if avail else CPU_KV_CACHE_BYTES
        num = budget // kv_block_bytes(self.model, cfg.block_size, cfg.dtype)
        if num < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes holds no block of "
                             f"{kv_block_bytes(self.model, cfg.block_size, cfg.dtype)} bytes")
        # More blocks than every running sequence at full context can use would only cost memory.
        return int(min(num, cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)))

    # -- requests -------------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams) -> Request:
        request_id = self.next_request_id
        self.next_request_id += 1
        text = prompt if isinstance(prompt, str) else None
        try:
            token_ids = self._prompt_token_ids(prompt)
            self._check_params(params)
            error = None
        except (TypeError, ValueError) as e:
            token_ids, error = [], str(e)
        request = Request(request_id, text, token_ids, params, error=error)
        self.stats.requests += 1
        if error is not None:
            self.stats.failed_requests += 1
            return request
        self.stats.prompt_tokens += len(token_ids)
        # One sequence; with n > 1 it is forked into n chains once its prompt is prefilled.
        request.seqs.append(Sequence(self._take_seq_id(), request, 0, self._generator(request, 0)))
        self.scheduler.add(request.seqs[0])
        return request

    def _check_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model.spec.vocab_size
        for name in ("stop_token_ids", "logprob_token_ids"):
            bad = [t for t in getattr(params, name) or [] if t >= vocab]
            if bad:
                raise ValueError(f"SamplingParams.{name} has ids {bad[:5]} outside this model's vocabulary "
                                 f"[0, {vocab})")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint has none; use stop_token_ids")

    def _prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer, and this checkpoint has none; pass token ids")
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = list(prompt)
        else:
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
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
        """Chain `chain_index`'s own RNG: from the request's seed when given, else from the engine's seeded RNG."""
        seed = request.params.seed
        if seed is None:
            seed = self.rng.randrange(1 << 62)
        else:
            seed = hash((seed, chain_index)) & ((1 << 62) - 1)  # ints and tuples of ints hash deterministically
        return torch.Generator().manual_seed(seed)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that finished in it."""
        step = self.scheduler.schedule()
        early, self.scheduler.finished_early = self.scheduler.finished_early, []
        if step is None:
            if early:
                return early
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress: the KV pool cannot hold one running sequence; "
                                   f"pool has {self.num_blocks} blocks of {self.config.block_size} tokens")
            return []
        logits = self.runner.run(step)
        if step.is_prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += sum(item.num_new for item in step.scheduled)
        else:
            self.stats.decode_steps += 1
        sampling: list[Sequence] = []
        rows: list[int] = []
        row = 0
        for item in step.scheduled:
            seq = item.seq
            seq.num_computed_tokens = item.end
            self.block_manager.mark_computed(seq, item.start)
            if not item.samples:
                continue
            family = [seq] + (self._fork(seq) if seq.needs_fork else [])
            sampling.extend(family)
            rows.extend([row] * len(family))
            row += 1
        if not sampling:
            return early
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        result = self.sampler(logits, sampling)
        finished = early
        for i, seq in enumerate(sampling):
            if self._append(seq, result.token_ids[i], result.logprobs[i], result.chosen_logprobs[i]):
                self.scheduler.finish(seq)
                finished.append(seq)
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

    def _append(self, seq: Sequence, token: int, logprob: float | None, chosen: dict[int, float] | None) -> bool:
        """Appends a sampled token; returns True when the sequence is finished."""
        p = seq.params
        seq.token_ids.append(token)
        self.stats.generated_tokens += 1
        if p.logprobs:
            seq.logprobs.append(logprob)
        if p.logprob_token_ids:
            seq.token_logprobs.append(chosen)
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
                return True
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return True
            if p.stop_strings and self._check_stop_strings(seq):
                return True
        elif p.stop_strings:
            self._detokenize(seq)
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
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
        longest = max(len(s) for s in p.stop_strings)
        window_start = max(0, len(seq.text) - len(new) - longest + 1)
        hits = [(seq.text.find(s, window_start), s) for s in p.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text = seq.text[:index + (len(stop) if p.include_stop_str_in_output else 0)]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    # -- outputs --------------------------------------------------------------------------------------------------
    def output(self, request: Request) -> RequestOutput:
        if request.error is not None:
            return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, [], True,
                                 request.error)
        outs = []
        for seq in sorted(request.seqs, key=lambda s: s.chain_index):
            p = seq.params
            if p.stop_strings and seq.stop_reason in p.stop_strings:
                text = seq.text
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=p.skip_special_tokens)
            else:
                text = ""
            outs.append(CompletionOutput(
                index=seq.chain_index, text=text, token_ids=seq.output_token_ids,
                logprobs=list(seq.logprobs) if p.logprobs else None,
                token_logprobs=list(seq.token_logprobs) if p.logprob_token_ids else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                             all(s.status is SequenceStatus.FINISHED for s in request.seqs))

"""LLMEngine over tensor-parallel ranks: the scheduler, block manager and sampler stay in the caller's process; the
model and the KV cache live in the ranks (prmkern/distributed/worker.py), one shard each.

`TensorParallelRunner` is the driver's ModelRunner: it builds each step's token ids, positions and attention
metadata exactly as the single-process runner does (same code: it inherits the preparation), on the host, and
hands them to the executor instead of running a model. Everything above the runner is the ordinary engine.
"""
from __future__ import annotations

import dataclasses

import torch

from prmkern.engine.block_manager import BlockManager
from prmkern.config import EngineConfig
from prmkern.distributed.executor import TensorParallelExecutor
from prmkern.distributed.sharding import check_divisible
from prmkern.engine.engine import LLMEngine
from prmkern.models.decoder import DecoderSpec
from prmkern.models.loader import model_spec, read_config
from prmkern.engine.runner import ModelRunner
from prmkern.engine.scheduler import SchedulerOutput


class _SpecOnly:
    """What the driver's engine knows of the model: its spec (vocabulary, context, EOS). No weights."""

    def __init__(self, spec: DecoderSpec):
        self.spec = spec


class TensorParallelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, executor: TensorParallelExecutor, spec: DecoderSpec, num_blocks: int,
                 block_manager: BlockManager, max_model_len: int):
        # Not ModelRunner.__init__: no model, no caches here. Inputs are prepared on the host and copied by each
        # rank to its own device.
        self.config = dataclasses.replace(config, device=torch.device("cpu"))
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.graphs = None
        self.packed_gemm = None
        self.executor = executor
        self.spec = spec
        executor.init_cache(num_blocks)

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> torch.Tensor:
        """As ModelRunner.run: float32 logits [num_sampling_rows, vocab], computed by the ranks."""
        if step.is_prefill:
            input_ids, positions, meta, rows = self._prepare_prefill(step.scheduled)
        else:
            input_ids, positions, meta, rows = self._prepare_decode(step)
        payload = (list(step.copies or []), input_ids, positions, meta, rows, step.is_prefill)
        return self.executor.execute(payload)


class TensorParallelEngine(LLMEngine):
    """LLMEngine whose model runs split over `tensor_parallel_size` spawned ranks. Call close() to stop them
    (they are also stopped when the engine is collected and at interpreter exit)."""

    def __init__(self, config: EngineConfig, tokenizer=None, tensor_parallel_size: int = 2, *,
                 step_timeout_s: float = 600.0):
        spec = model_spec(read_config(config.model))
        check_divisible(spec, tensor_parallel_size)
        self.tensor_parallel_size = tensor_parallel_size
        # CUDA graphs are not captured across ranks yet (an all-reduce inside a captured graph is untested here).
        config = dataclasses.replace(config, enforce_eager=True)
        self._spec = spec
        self.executor = TensorParallelExecutor(config, tensor_parallel_size, step_timeout_s=step_timeout_s)
        try:
            super().__init__(config, tokenizer)
        except BaseException:
            self.executor.close()
            raise

    def _load_model(self):
        return _SpecOnly(self._spec)

    def _num_blocks(self) -> int:
        # what fits on the fullest rank, capped as the single-process engine caps it
        cfg = self.config
        return int(min(self.executor.capacity, cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)))

    def _make_runner(self) -> ModelRunner:
        return TensorParallelRunner(self.config, self.executor, self._spec, self.num_blocks, self.block_manager,
                                    self.max_model_len)

    def close(self) -> None:
        self.executor.close()

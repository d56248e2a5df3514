"""Beyond one device, on torch.distributed: tensor-parallel engines (`LLM(model, tensor_parallel_size=T)`).
NCCL on GPUs, gloo on CPUs. Data-parallel jobs are a mode of the command line's job runner (prmkern/cli/shards.py). See
docs/distributed.md."""
from prmkern.distributed.executor import TensorParallelExecutor, WorkerError
from prmkern.distributed.sharding import ShardPlan, load_shard
from prmkern.distributed.tp_engine import TensorParallelEngine

__all__ = ["ShardPlan", "TensorParallelEngine", "TensorParallelExecutor", "WorkerError", "load_shard"]

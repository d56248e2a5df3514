"""Beyond one device, on torch.distributed: tensor-parallel engines (`LLM(model, tensor_parallel_size=T)`) and
data-parallel jobs (`torchrun --nproc-per-node N -m prmkern ...`). NCCL on GPUs, gloo on CPUs. See
docs/distributed.md."""
from prmkern.distributed.executor import TensorParallelExecutor, WorkerError
from prmkern.distributed.sharding import ShardPlan, load_shard
from prmkern.distributed.tp_engine import TensorParallelEngine

__all__ = ["ShardPlan", "TensorParallelEngine", "TensorParallelExecutor", "WorkerError", "load_shard"]

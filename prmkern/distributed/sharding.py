"""Tensor-parallel sharding of the decoder: which slice of each weight a rank holds, and loading exactly that slice.

Megatron's split, as vLLM, SGLang and nano-vllm do it. For `T` ranks and rank `r`:
- q/k/v projections by output rows (column parallel): rank r holds query heads [r*H/T, (r+1)*H/T) and their KV
  heads. When T > num KV heads, each KV head is replicated on the T/Hkv ranks whose query heads read it.
- gate/up projections by output rows: rank r holds a contiguous range of the intermediate features (ranges differ by
  at most one feature when T does not divide the intermediate size).
- o/down projections by input columns (row parallel): each rank computes a partial sum of the full hidden vector;
  a forward hook all-reduces it (sum over ranks). A bias, if any, is held by rank 0 only so it is added once.
- Embedding, norms, rotary: replicated. LM head: held by rank 0 only (the rank that computes logits for the
  sampler); the others never compute logits and do not allocate it. Not vocabulary-parallel: see docs/distributed.md.

Weights are read straight from the safetensors slices (`safe_open(...).get_slice`): a rank never materialises
another rank's shard. The model code is unchanged: a rank's model is an ordinary `DecoderForCausalLM` built from a
*local* spec (its own head and feature counts), so the attention backends, prefix sharing and cascade decode run
per rank exactly as in one process.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open

from prmkern.models.decoder import DecoderForCausalLM, DecoderSpec
from prmkern.models.loader import check_all_loaded, _load_tensor, _safetensors_files, model_spec, read_config


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `world`: the row ranges it takes from each column-parallel weight and its local spec."""

    rank: int
    world: int
    q_rows: tuple[int, int]  # rows of q_proj (and columns of o_proj)
    kv_rows: tuple[int, int]  # rows of k_proj / v_proj
    mlp_rows: tuple[int, int]  # rows of gate_proj / up_proj (and columns of down_proj)
    local_spec: DecoderSpec

    @classmethod
    def make(cls, spec: DecoderSpec, rank: int, world: int) -> "ShardPlan":
        check_divisible(spec, world)
        h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        heads = h // world
        if hkv >= world:
            kv_heads, kv_first = hkv // world, rank * (hkv // world)
        else:  # fewer KV heads than ranks: each KV head replicated over world // hkv consecutive ranks
            kv_heads, kv_first = 1, rank // (world // hkv)
        base, extra = divmod(spec.intermediate_size, world)
        sizes = [base + (i < extra) for i in range(world)]
        first = sum(sizes[:rank])
        local = dataclasses.replace(spec, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=sizes[rank])
        return cls(rank=rank, world=world, q_rows=(rank * heads * d, (rank + 1) * heads * d),
                   kv_rows=(kv_first * d, (kv_first + kv_heads) * d), mlp_rows=(first, first + sizes[rank]),
                   local_spec=local)


def check_divisible(spec: DecoderSpec, world: int) -> None:
    """Raises ValueError when `world` ranks cannot split this model's heads."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"tensor_parallel_size={world!r} is invalid; accepted: an int >= 1")
    h, hkv = spec.num_heads, spec.num_kv_heads
    if h % world:
        raise ValueError(f"tensor_parallel_size={world} must divide the model's {h} attention heads; "
                         f"accepted: a divisor of {h}")
    if hkv % world and world % hkv:
        raise ValueError(f"tensor_parallel_size={world} and the model's {hkv} KV heads: one must divide the other "
                         f"(KV heads are split when there are at least as many as ranks, replicated otherwise)")
    if spec.intermediate_size < world:
        raise ValueError(f"tensor_parallel_size={world} exceeds the MLP's {spec.intermediate_size} features")


def _slice(sl, name: str, plan: ShardPlan) -> torch.Tensor | None:
    """The part of checkpoint tensor `name` this rank holds (None: not held by this rank)."""
    parts = name.split(".")
    proj, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
    rows = {"q_proj": plan.q_rows, "k_proj": plan.kv_rows, "v_proj": plan.kv_rows,
            "gate_proj": plan.mlp_rows, "up_proj": plan.mlp_rows}.get(proj)
    if rows is not None:  # column parallel: output rows (weight [out, in], bias [out])
        return sl[rows[0]:rows[1]]
    cols = {"o_proj": plan.q_rows, "down_proj": plan.mlp_rows}.get(proj)
    if cols is not None:  # row parallel: input columns; the bias once (rank 0), zeros elsewhere
        if kind == "weight":
            return sl[:, cols[0]:cols[1]]
        full = sl[:]
        return full if plan.rank == 0 else torch.zeros_like(full)
    if name == "lm_head.weight" and plan.rank != 0:
        return None
    return sl[:]


def _all_reduce_output(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    # [num_tokens, hidden] partial sums over this rank's heads / features -> the full projection on every rank
    dist.all_reduce(output)
    return output


def load_shard(model_dir: str, dtype: torch.dtype, device: torch.device | str, rank: int,
               world: int) -> DecoderForCausalLM:
    """Rank `rank`'s shard of the checkpoint in `model_dir`, with all-reduces after o_proj and down_proj.

    Needs an initialised default process group of `world` ranks when world > 1 (the hooks all-reduce over it)."""
    spec = model_spec(read_config(model_dir))
    plan = ShardPlan.make(spec, rank, world)
    with torch.device("meta"):
        model = DecoderForCausalLM(plan.local_spec)
    if rank != 0:
        model.lm_head = None  # logits are computed on rank 0 only
    model = model.to_empty(device=device).to(dtype)
    model.init_rope(device)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    with torch.no_grad():
        for file in _safetensors_files(model_dir):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if "rotary_emb" in name:
                        continue
                    tensor = _slice(f.get_slice(name), name, plan)
                    if tensor is None or (name == "lm_head.weight" and spec.tie_word_embeddings):
                        continue
                    _load_tensor(model, plan.local_spec, params, name, tensor, loaded)
    if spec.tie_word_embeddings and rank == 0:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    check_all_loaded(params, loaded, model_dir)
    if world > 1:
        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(_all_reduce_output)
            layer.mlp.down_proj.register_forward_hook(_all_reduce_output)
    return model.eval()


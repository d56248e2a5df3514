"""Tensor parallelism on the CPU with gloo: TP=2 ranks (spawned processes) give the same greedy tokens as TP=1 and as
transformers on Qwen2, Llama and Qwen3 checkpoints (Qwen3's single KV head is replicated on both ranks), with chains
sharing a prompt (n > 1, cascade decode) and preemption in a small KV pool; shards reassemble the full weights; a
failure on rank 1 (raised or killed) surfaces in the caller within seconds."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from prmkern import LLM, SamplingParams
from prmkern.distributed import ShardPlan, WorkerError, load_shard
from prmkern.distributed.sharding import check_divisible
from prmkern.models import load_model
from prmkern.models.loader import model_spec, read_config
from tests.conftest import hf_greedy, hf_model, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
CHAINS = SamplingParams(n=3, temperature=1.0, max_tokens=12, ignore_eos=True, seed=5)
SMALL_POOL = dict(device="cpu", block_size=8, num_kvcache_blocks=18)  # < the ~30 blocks all would need


def _tokens(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.mark.parametrize("name", ["qwen2", "llama3", "qwen3"])
def test_tp2_matches_tp1_and_transformers(checkpoint_dirs, name):
    path = checkpoint_dirs[name]
    prompts = random_prompts([5, 16, 33, 58], 509, seed=3)
    shared = random_prompts([41], 509, seed=4)[0]
    hf = hf_model(path)
    refs = [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    del hf
    one = LLM(path, **SMALL_POOL)
    ref_greedy = _tokens(one.generate(prompts, GREEDY))
    ref_chains = _tokens(one.generate([shared], CHAINS))
    with LLM(path, tensor_parallel_size=2, **SMALL_POOL) as llm:
        greedy = _tokens(llm.generate(prompts, GREEDY))
        assert llm.stats.preemptions > 0, "the pool was meant to be too small for every sequence at once"
        chains = _tokens(llm.generate([shared], CHAINS))
        assert llm.stats.cached_tokens >= 0
    assert [g[0] for g in greedy] == refs
    assert greedy == ref_greedy
    assert chains == ref_chains and len(chains[0]) == 3
    assert len({tuple(c) for c in chains[0]}) > 1  # sampled chains differ: three chains, not one copied


def test_tp2_error_on_rank1_raises_within_seconds(checkpoint_dirs):
    path = checkpoint_dirs["qwen2-tied"]  # tied embeddings: rank 0 alone holds the LM head (= the embedding)
    prompts = random_prompts([7, 30], 509, seed=9)
    ref = _tokens(LLM(path, device="cpu").generate(prompts, GREEDY))
    llm = LLM(path, device="cpu", tensor_parallel_size=2)
    assert _tokens(llm.generate(prompts, GREEDY)) == ref
    outs = llm.generate([prompts[0], [1, 509], prompts[1]], GREEDY)  # a bad request fails alone
    assert "[0, 509)" in outs[1].error and _tokens([outs[0], outs[2]]) == ref
    pids = llm.engine.executor.pids
    llm.engine.executor.inject_fault(rank=1, after_steps=2)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 failed: RuntimeError: injected fault on rank 1"):
        llm.generate(prompts, GREEDY)
    assert time.monotonic() - start < 10
    with pytest.raises(WorkerError, match="stopped after an error"):
        llm.generate(prompts, GREEDY)
    for pid in pids:  # every rank was stopped, not left blocked in a collective
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_tp2_killed_rank_raises_within_seconds(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", tensor_parallel_size=2)
    os.kill(llm.engine.executor.pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 (exited|closed)"):
        llm.generate(random_prompts([12], 509, seed=1), GREEDY)
    assert time.monotonic() - start < 10
    llm.close()


def test_bad_tensor_parallel_size_is_refused(qwen2_dir):
    for bad in (4, 0, -2):  # 6 heads over 2 KV heads: 4 divides neither; 0 and negatives are no size
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            LLM(qwen2_dir, device="cpu", tensor_parallel_size=bad)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama3", "qwen2-tied"])
def test_shards_reassemble_the_full_weights(checkpoint_dirs, name):
    path = checkpoint_dirs[name]
    full = load_model(path, torch.float32, "cpu")
    spec = full.spec
    world = 2
    shards = [load_shard(path, torch.float32, "cpu", r, world) for r in range(world)]
    plans = [ShardPlan.make(spec, r, world) for r in range(world)]
    q, kv, d = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.head_dim
    for i, layer in enumerate(full.model.layers):
        parts = [s.model.layers[i] for s in shards]
        w = layer.self_attn.qkv_proj.weight
        lq = [p.self_attn.qkv_proj.weight[:plan.q_rows[1] - plan.q_rows[0]] for p, plan in zip(parts, plans)]
        assert torch.equal(torch.cat(lq), w[:q])
        for p, plan in zip(parts, plans):  # each rank's K and V rows are the KV heads its query heads read
            lw = p.self_attn.qkv_proj.weight
            nq, nkv = plan.local_spec.num_heads * d, plan.local_spec.num_kv_heads * d
            a, b = plan.kv_rows
            assert torch.equal(lw[nq:nq + nkv], w[q + a:q + b])
            assert torch.equal(lw[nq + nkv:], w[q + kv + a:q + kv + b])
            group = spec.num_heads // spec.num_kv_heads  # query head h reads KV head h // group
            assert all(a // d <= h // group < b // d for h in range(plan.q_rows[0] // d, plan.q_rows[1] // d))
        assert torch.equal(torch.cat([p.self_attn.o_proj.weight for p in parts], 1), layer.self_attn.o_proj.weight)
        inter = spec.intermediate_size
        gate = torch.cat([p.mlp.gate_up_proj.weight[:plan.local_spec.intermediate_size]
                          for p, plan in zip(parts, plans)])
        up = torch.cat([p.mlp.gate_up_proj.weight[plan.local_spec.intermediate_size:]
                        for p, plan in zip(parts, plans)])
        assert torch.equal(gate, layer.mlp.gate_up_proj.weight[:inter])
        assert torch.equal(up, layer.mlp.gate_up_proj.weight[inter:])
        assert torch.equal(torch.cat([p.mlp.down_proj.weight for p in parts], 1), layer.mlp.down_proj.weight)
    assert torch.equal(shards[0].lm_head.weight, full.lm_head.weight) and shards[1].lm_head is None
    assert all(torch.equal(s.model.embed_tokens.weight, full.model.embed_tokens.weight) for s in shards)


def test_shard_plan_rules(qwen2_dir):
    spec = model_spec(read_config(qwen2_dir))  # 6 heads, 2 KV heads, head dim 16, 197 MLP features
    plans = [ShardPlan.make(spec, r, 6) for r in range(6)]  # 6 ranks: each KV head on 3 ranks
    assert [p.kv_rows for p in plans] == [(0, 16)] * 3 + [(16, 32)] * 3
    assert [p.local_spec.num_heads for p in plans] == [1] * 6
    sizes = [p.mlp_rows[1] - p.mlp_rows[0] for p in plans]
    assert sum(sizes) == 197 and max(sizes) - min(sizes) <= 1
    assert plans[-1].mlp_rows[1] == 197 and all(a.mlp_rows[1] == b.mlp_rows[0] for a, b in zip(plans, plans[1:]))
    for bad in (4, 5, 12):
        with pytest.raises(ValueError, match=f"tensor_parallel_size={bad}"):
            check_divisible(spec, bad)


def test_row_parallel_biases_are_added_once(tmp_path):
    """Llama with attention and MLP biases: the ranks' o/down partial products plus rank 0's bias sum to the full
    projection (what the all-reduce computes), for inputs split like the ranks' heads and features."""
    from prmkern.tiny import build_checkpoint
    path = build_checkpoint(str(tmp_path / "llama-bias"), "llama", tokenizer=False, vocab_size=64, hidden_size=48,
                            intermediate_size=37, num_attention_heads=4, num_key_value_heads=2,
                            attention_bias=True, mlp_bias=True)
    full = load_model(path, torch.float32, "cpu")
    world = 2
    shards = [load_shard(path, torch.float32, "cpu", r, world) for r in range(world)]
    plans = [ShardPlan.make(full.spec, r, world) for r in range(world)]
    g = torch.Generator().manual_seed(0)
    for name, cols in (("self_attn.o_proj", "q_rows"), ("mlp.down_proj", "mlp_rows")):
        whole = full.model.layers[0].get_submodule(name)
        x = torch.randn(5, whole.in_features, generator=g, dtype=torch.float64)
        ref = torch.nn.functional.linear(x, whole.weight.double(), whole.bias.double())
        total = sum(torch.nn.functional.linear(x[:, slice(*getattr(plan, cols))],
                                               s.model.layers[0].get_submodule(name).weight.double(),
                                               s.model.layers[0].get_submodule(name).bias.double())
                    for s, plan in zip(shards, plans))
        torch.testing.assert_close(total, ref)
        assert not torch.any(shards[1].model.layers[0].get_submodule(name).bias)


def test_ranks_stop_when_the_llm_is_collected(qwen2_dir):
    import gc
    llm = LLM(qwen2_dir, device="cpu", tensor_parallel_size=2)
    pids = llm.engine.executor.pids
    assert all(os.kill(pid, 0) is None for pid in pids)  # alive
    del llm
    gc.collect()
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.1)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is visible")
def test_tp_on_missing_gpus_is_refused(qwen2_dir):
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        LLM(qwen2_dir, device="cuda", tensor_parallel_size=2)


def test_killed_rank_stops_a_cli_job(tmp_path, qwen2_dir, monkeypatch):
    """A dead rank ends a JSONL job with WorkerError instead of writing every remaining record as failed (the
    engine cannot run again); the output keeps only real rows, so `--resume` redoes the rest."""
    import json

    from prmkern.cli import entry as cli, options
    made = []
    real = options.make_llm

    def make(args, *a, **kw):
        llm = real(args, *a, **kw)
        made.append(llm)
        os.kill(llm.engine.executor.pids[1], signal.SIGKILL)
        return llm
    monkeypatch.setattr(options, "make_llm", make)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": [3, 4 + i]}) + "\n" for i in range(3)))
    try:
        with pytest.raises(WorkerError, match=r"rank 1 (exited|closed)"):
            cli.main(["generate", str(inp), "-o", str(out), "--model", qwen2_dir, "--device", "cpu", "--temperature",
                      "0", "--max-tokens", "2", "--batch-size", "1", "--tensor-parallel-size", "2", "--no-progress"])
        assert out.read_text() == ""
    finally:
        for llm in made:
            llm.close()


def _listening(pid: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets process `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # state LISTEN, owned by this process
                    out.append(cols[1])
    return out


def test_rendezvous_store_listens_on_loopback_only(qwen2_dir):
    # Before: rank 0's TCPStore listened on every interface ([::]:port) for a one-node run.
    llm = LLM(qwen2_dir, device="cpu", tensor_parallel_size=2)
    try:
        addrs = [a for pid in llm.engine.executor.pids for a in _listening(pid)]
        assert addrs, "rank 0 hosts the rendezvous store: it must listen somewhere"
        loopback = ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")
        assert all(a.startswith(loopback) for a in addrs), addrs
    finally:
        del llm

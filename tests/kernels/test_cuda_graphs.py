"""Decode graphs (prmkern/engine/cuda_graphs.py) without a GPU: mode 'eager' re-runs the captured function on the static
buffers, so the padding, bucketing, fixed launch sizes and buffer refills are checked here under the Triton
interpreter against the torch backend; only torch.cuda.graph itself is left to a GPU."""
from __future__ import annotations

import pytest
import torch

from prmkern.attention.backend import BACKENDS
from prmkern.attention.triton_backend import TritonBackend
from prmkern.engine.cuda_graphs import DecodeGraphs, batch_buckets


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_cuda_mode_needs_cuda():
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(forward=lambda *a: None, max_batch=4, max_model_len=64, block_size=16, num_kv_heads=2,
                     device=torch.device("cpu"), splits_rule=lambda *a: 1)
    with pytest.raises(ValueError, match="accepted"):
        DecodeGraphs(forward=lambda *a: None, max_batch=4, max_model_len=64, block_size=16, num_kv_heads=2,
                     device=torch.device("cpu"), splits_rule=lambda *a: 1, mode="lazy")


def test_engine_decode_from_graphs_gives_torch_backend_tokens(qwen2_dir, monkeypatch):
    """Greedy tokens of the engine with decode steps served from (eager-replayed) graphs equal the torch backend's.
    Requests end at different steps, so the batch shrinks 7 -> 4 -> 1 through buckets 8, 4 and 1, with shared-prefix
    groups (cascade graphs, group sizes 3) and, at the end, a lone chain (plain graph)."""
    from prmkern import LLM, SamplingParams
    from tests.conftest import random_prompts

    class LowThresholds(TritonBackend):
        def __init__(self):
            super().__init__(min_chains=2, min_prefix_tokens=8)

    monkeypatch.setitem(BACKENDS, "triton", LowThresholds)
    prompts = random_prompts([40, 7, 21], 509, seed=5)
    # top-1 sampling: greedy tokens for n > 1 chains (vLLM, and so prmkern, refuse greedy n > 1)
    params = [SamplingParams(temperature=1.0, top_k=1, max_tokens=4, ignore_eos=True, n=3),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, n=1),
              SamplingParams(temperature=1.0, top_k=1, max_tokens=6, ignore_eos=True, n=3)]

    def run(backend: str, graphs: bool):
        llm = LLM(qwen2_dir, device="cpu", dtype=torch.float32, attention_backend=backend, block_size=8,
                  max_model_len=96)
        runner = llm.engine.runner
        if graphs:
            runner.graphs = runner.make_graphs("eager")
        tokens = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
        return tokens, runner.graphs

    want, _ = run("torch", graphs=False)
    got, graphs = run("triton", graphs=True)
    assert got == want
    keys = set(graphs.graphs)
    assert (8, True, 4) in keys and (1, False, 0) in keys, keys
    assert graphs.replays == max(p.max_tokens for p in params) - 1  # every decode step came from a graph

    # A second call reuses the captured shapes (buffers refilled, nothing stale): same tokens, no new keys.
    llm = LLM(qwen2_dir, device="cpu", dtype=torch.float32, attention_backend="triton", block_size=8,
              max_model_len=96)
    llm.engine.runner.graphs = g = llm.engine.runner.make_graphs("eager")
    first = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
    n_keys = len(g.graphs)
    second = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts[::-1], params[::-1])]
    assert first == want and second == want[::-1] and len(g.graphs) == n_keys


def test_batch_larger_than_graphs_runs_eagerly(qwen2_dir):
    from prmkern import LLM, SamplingParams
    from tests.conftest import random_prompts

    llm = LLM(qwen2_dir, device="cpu", dtype=torch.float32, attention_backend="triton", block_size=8,
              max_model_len=64)
    runner = llm.engine.runner
    runner.config.max_graph_batch = 2
    runner.graphs = runner.make_graphs("eager")
    out = llm.generate(random_prompts([9], 509, seed=1), SamplingParams(temperature=1.0, top_k=1, max_tokens=3,
                                                                        n=3, ignore_eos=True))
    assert len(out[0].outputs) == 3 and runner.graphs.replays == 0 and not runner.graphs.graphs



def _decode_meta(seq_lens: list[int], groups: list[int], prefix_blocks: list[int], block_size: int = 4):
    """Metadata of a decode step: rows ordered by group (`groups` chain counts), group g sharing prefix_blocks[g]
    blocks; every row's blocks are distinct numbers (so stale entries are recognisable)."""
    from prmkern.attention.metadata import AttentionMetadata, DecodeMetadata

    starts = [0]
    for n in groups:
        starts.append(starts[-1] + n)
    tables = [[100 * r + j for j in range(-(-L // block_size))] for r, L in enumerate(seq_lens)]
    plens = [p * block_size for p in prefix_blocks]
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731

    def pad(rows):
        w = max(1, max(len(r) for r in rows))
        return t([r + [-1] * (w - len(r)) for r in rows])

    row_plen = [plens[g] for g in range(len(groups)) for _ in range(groups[g])]
    dm = DecodeMetadata(seq_lens=t(seq_lens), block_tables=pad(tables), group_starts=t(starts), prefix_lens=t(plens),
                        prefix_block_tables=pad([tables[starts[g]][:prefix_blocks[g]] for g in range(len(groups))]),
                        suffix_lens=t([L - p for L, p in zip(seq_lens, row_plen)]),
                        suffix_block_tables=pad([tb[p // block_size:] for tb, p in zip(tables, row_plen)]),
                        max_seq_len=max(seq_lens), max_prefix_len=max(plens), max_suffix_len=max(seq_lens),
                        group_starts_list=starts, prefix_lens_list=plens)
    slots = torch.tensor([tb[(L - 1) // block_size] * block_size + (L - 1) % block_size
                          for tb, L in zip(tables, seq_lens)], dtype=torch.int64)
    return AttentionMetadata(slot_mapping=slots, decode=dm)


def test_refill_leaves_no_stale_row():
    """A bucket used by 7 rows then by 5: rows 5..7 must read as padding again (slot -1, length 0, no blocks), the
    5 rows' groups must be followed by one prefix-0 group per padded row, and the kernels' launch sizes must be
    the fixed ones of the key."""
    seen = []

    def forward(ids, pos, meta):
        seen.append(meta)
        return torch.zeros(ids.shape[0], 11)

    g = DecodeGraphs(forward=forward, max_batch=8, max_model_len=40, block_size=4, num_kv_heads=2,
                     device=torch.device("cpu"), splits_rule=lambda programs, n, dev: 3, mode="eager")
    big = _decode_meta([9, 9, 9, 12, 12, 7, 30], groups=[3, 2, 2], prefix_blocks=[2, 2, 1])
    small = _decode_meta([10, 10, 10, 10, 5], groups=[4, 1], prefix_blocks=[2, 0])
    for meta, n in ((big, 7), (small, 5)):
        logits = g.run(torch.arange(n), torch.arange(n), meta, cascade=True)
        assert logits.shape == (n, 11)
    assert set(g.graphs) == {(8, True, 4)} and g.replays == 2
    s = seen[-1].decode
    assert seen[-1].slot_mapping.tolist() == small.slot_mapping.tolist() + [-1] * 3
    assert s.seq_lens.tolist() == [10, 10, 10, 10, 5, 0, 0, 0] and s.suffix_lens.tolist()[5:] == [0] * 3
    assert (s.block_tables[5:] == -1).all() and (s.suffix_block_tables[5:] == -1).all()
    assert s.block_tables[:5, :3].tolist() == small.decode.block_tables.tolist()
    assert (s.block_tables[:, 3:] == -1).all()  # big's row 6 had 8 blocks
    assert s.group_starts.tolist() == [0, 4, 5, 6, 7, 8, 8, 8, 8]  # groups, one group per padded row, empty groups
    assert s.prefix_lens.tolist() == [8, 0] + [0] * 6 and (s.prefix_block_tables[2:] == -1).all()
    assert s.prefix_block_tables[0, :2].tolist() == [0, 1] and (s.prefix_block_tables[0, 2:] == -1).all()
    # the cascade kernel's splits come from its own rule at capture (not the plain kernel's rule)
    assert (s.cascade, s.max_group_size, s.num_splits, s.prefix_num_splits) == (True, 4, None, None)
    assert s.max_seq_len == 40 and s.block_tables.shape == (8, 10)


def test_every_output_row_written_from_a_poisoned_pool(monkeypatch):
    """The graph pool holds garbage: every fresh float buffer here is NaN (torch.empty poisoned). A bucket of 8
    served to 5 lone chains (group-size bucket 1) with GQA 8 leaves 3 padded rows = 24 query rows, more than one
    row tile (16); every output row, padding included, must still be written: real rows equal float64 attention,
    padded rows (no keys) are 0. Catches a fill that puts all padded rows in one group (rows past the tile)."""
    from tests.kernels.conftest import ref_paged_decode

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(800, 4, 1, 16, generator=gen)
    v_cache = torch.randn(800, 4, 1, 16, generator=gen)
    q = torch.randn(8, 8, 16, generator=gen)
    backend = TritonBackend(min_chains=1, min_prefix_tokens=1)

    def forward(ids, pos, meta):  # the attention of one layer stands in for the model
        return backend.decode(q[:ids.shape[0]], k_cache, v_cache, meta.decode, 0.25).reshape(ids.shape[0], -1)

    g = DecodeGraphs(forward=forward, max_batch=8, max_model_len=40, block_size=4, num_kv_heads=1,
                     device=torch.device("cpu"), splits_rule=lambda programs, n, dev: 2, mode="eager")
    lens = [9, 13, 5, 30, 17]
    meta = _decode_meta(lens, groups=[1] * 5, prefix_blocks=[0] * 5)
    logits = g.run(torch.arange(5), torch.arange(5), meta, cascade=True)
    assert set(g.graphs) == {(8, True, 1)}
    full = g.graphs[(8, True, 1)].logits.reshape(8, 8, 16)  # every row of the static output, padding included
    assert not torch.isnan(full).any(), f"unwritten rows: {torch.isnan(full).any(-1).any(-1).nonzero().flatten()}"
    assert (full[5:] == 0).all()
    want, _ = ref_paged_decode(q[:5], k_cache, v_cache, meta.decode.block_tables, lens, 0.25)
    torch.testing.assert_close(logits.reshape(5, 8, 16).double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_decode_matches_eager_on_gpu(qwen2_dir):
    """On a GPU: the engine's default (decode from captured CUDA graphs) gives the tokens of enforce_eager, for a
    shared-prefix batch and a lone chain, in fp32 and bf16."""
    from prmkern import LLM, SamplingParams
    from tests.conftest import random_prompts

    prompts = random_prompts([300, 40], 509, seed=11)
    params = [SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True, n=5),  # top-1: greedy
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=1)]
    for dtype in (torch.float32, torch.bfloat16):
        runs = []
        for eager in (True, False):
            llm = LLM(qwen2_dir, device="cuda", dtype=dtype, enforce_eager=eager, max_model_len=512)
            runs.append([[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)])
            graphs = llm.engine.runner.graphs
            assert (graphs is None) == eager and (eager or graphs.replays > 0)
        assert runs[0] == runs[1], dtype

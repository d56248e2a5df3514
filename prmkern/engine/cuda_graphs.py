"""Decode steps replayed from captured CUDA graphs.

A decode step of a small model is dozens of kernel launches per layer; on a GPU their launch cost, not the
arithmetic, sets the step time at small batch. `DecodeGraphs` captures the whole decode forward (embedding, every
layer with its KV store and attention, final norm, LM head) once per shape and replays it: the step's inputs and
attention metadata are copied into static buffers that the captured kernels read.

A graph's launches may depend on no value of the step, so a captured shape is a key
  (batch bucket B, cascade, group-size bucket)
- B: the step's batch rounded up to a bucket (1, 2, 4, 8, then multiples of 16 up to `max_batch`); the padded rows
  store nothing (slot -1), attend nothing (length 0) and their logits are dropped.
- cascade: whether every row takes the shared-prefix path (one fused cascade_decode launch per layer) or plain
  paged_decode. The backend's per-step choice (TritonBackend.shared_groups) picks the graph.
- group-size bucket: the largest group's chain count rounded up to a power of two (it sizes the shared-prefix grid).
Block tables are padded to the widest a sequence can need (max_model_len / block_size) and the split counts are
fixed for the longest sequence, each kernel's from its own program count; kernels size their splits per row, so
short rows leave splits empty. Padded rows are each a group of their own, so every output row is written.

Graphs are captured lazily, on the first step of each key (after one eager warm-up run that compiles the Triton
kernels), and share one memory pool. `mode="eager"` replays by re-running the captured function on the static
buffers instead of a CUDA graph: the same padding and buffer logic, testable on a CPU under the Triton interpreter
(tests/kernels/test_cuda_graphs.py). Only the Triton backend is captured: the torch backend loops on host lists.

It does not: capture prefill steps (their token counts vary; their launches are few per token), or capture during
`__init__` (vLLM captures every bucket at start-up; here the first step of a new shape pays the capture).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from prmkern.attention.metadata import AttentionMetadata, DecodeMetadata

GRAPH_MODES = ("cuda", "eager")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, ... up to and including max_batch (rounded up to a multiple of 16 past 8)."""
    out = [b for b in (1, 2, 4, 8) if b <= max_batch]
    b = 16
    while out[-1] < max_batch:
        out.append(b)
        b += 16
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Captured:
    """Static buffers of one key and the replay of its captured forward."""
    input_ids: torch.Tensor  # int64 [B]
    positions: torch.Tensor  # int64 [B]
    meta: AttentionMetadata  # every tensor [B, ...] static; host ints fixed
    logits: torch.Tensor | None  # float32 [B, vocab], written by each replay
    replay: Callable[[], None]


class DecodeGraphs:
    def __init__(self, *, forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
                 max_batch: int, max_model_len: int, block_size: int, num_kv_heads: int, device: torch.device,
                 splits_rule: Callable[[int, int, torch.device], int], mode: str = "cuda"):
        """forward(input_ids [B], positions [B], meta) -> float32 logits [B, vocab]: the model's decode step.
        splits_rule(programs, max_len, device) -> KV splits (the kernels' rule; applied to max_model_len)."""
        if mode not in GRAPH_MODES:
            raise ValueError(f"mode={mode!r}; accepted: {GRAPH_MODES}")
        if mode == "cuda" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}; use mode='eager' to test the logic")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r}; accepted: an int >= 1")
        self.forward = forward
        self.mode = mode
        self.device = device
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.num_kv_heads = num_kv_heads
        self.splits_rule = splits_rule
        self.graphs: dict[tuple[int, bool, int], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self.replays = 0  # steps served from a graph (a counter for stats and tests)

    def key(self, batch: int, meta: DecodeMetadata, cascade: bool) -> tuple[int, bool, int] | None:
        """The captured shape that serves this step, or None when no graph can (batch too large)."""
        bucket = next((b for b in self.buckets if b >= batch), None)
        if bucket is None:
            return None
        starts = meta.group_starts_list
        largest = max(starts[g + 1] - starts[g] for g in range(len(starts) - 1)) if cascade else 1
        return bucket, cascade, min(_next_pow2(largest), bucket) if cascade else 0

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            cascade: bool) -> torch.Tensor | None:
        """float32 logits [batch, vocab] of this decode step from a graph, or None when no graph fits (the caller
        runs eagerly). The returned tensor is a view of a static buffer: read it before the next step."""
        dm = meta.decode
        if dm is None:
            raise ValueError("DecodeGraphs.run takes decode steps only")
        batch = input_ids.shape[0]
        key = self.key(batch, dm, cascade)
        if key is None:
            return None
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(*key)
        self._fill(g, input_ids, positions, meta)
        g.replay()
        self.replays += 1
        return g.logits[:batch]

    # ---------------------------------------------------------------------------------------------------------
    def _static(self, bucket: int, cascade: bool, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                          AttentionMetadata]:
        dev, B, W = self.device, bucket, self.max_blocks

        def i32(*shape, fill=0):
            return torch.full(shape, fill, dtype=torch.int32, device=dev)

        # Split counts per kernel from its own program count: plain paged_decode has B x KV heads programs over up to
        # max_model_len keys; the cascade kernel applies its own rule (prefix and suffix splits, state budget) to
        # this key's fixed host ints (bucket, group-size bucket, max_model_len) at capture (None here).
        splits = None if cascade else self.splits_rule(B * self.num_kv_heads, self.max_model_len, dev)
        decode = DecodeMetadata(
            seq_lens=i32(B), block_tables=i32(B, W, fill=-1), group_starts=i32(B + 1), prefix_lens=i32(B),
            prefix_block_tables=i32(B, W, fill=-1), suffix_lens=i32(B), suffix_block_tables=i32(B, W, fill=-1),
            max_seq_len=self.max_model_len, max_prefix_len=self.max_model_len, max_suffix_len=self.max_model_len,
            group_starts_list=[0, B], prefix_lens_list=[0],
            cascade=cascade, max_group_size=group_size if cascade else None, num_splits=splits,
            prefix_num_splits=None)
        meta = AttentionMetadata(slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=dev), decode=decode)
        return (torch.zeros(B, dtype=torch.int64, device=dev), torch.zeros(B, dtype=torch.int64, device=dev), meta)

    def _capture(self, bucket: int, cascade: bool, group_size: int) -> _Captured:
        input_ids, positions, meta = self._static(bucket, cascade, group_size)
        # Every row its own group of prefix length 0 while capturing: valid metadata whatever the key.
        meta.decode.group_starts.copy_(torch.arange(bucket + 1, dtype=torch.int32, device=self.device).clamp_(
            max=bucket))
        g = _Captured(input_ids, positions, meta, None, lambda: None)
        if self.mode == "eager":
            def replay() -> None:
                g.logits = self.forward(g.input_ids, g.positions, g.meta)
            replay()
            g.replay = replay
            return g
        # Warm up on a side stream (Triton compiles, allocator settles), then capture on it.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.forward(input_ids, positions, meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            g.logits = self.forward(input_ids, positions, meta)
        g.replay = graph.replay
        return g

    def _fill(self, g: _Captured, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Copy the step into the static buffers; padded rows get slot -1, length 0 and a group of their own."""
        n = input_ids.shape[0]
        s, d = g.meta.decode, meta.decode
        g.input_ids[:n].copy_(input_ids)
        g.positions[:n].copy_(positions)
        g.meta.slot_mapping.fill_(-1)
        g.meta.slot_mapping[:n].copy_(meta.slot_mapping)
        for name in ("seq_lens", "suffix_lens"):
            dst = getattr(s, name)
            dst.zero_()
            dst[:n].copy_(getattr(d, name))
        for name in ("block_tables", "suffix_block_tables"):
            dst, src = getattr(s, name), getattr(d, name)
            dst.fill_(-1)
            dst[:n, :src.shape[1]].copy_(src)
        if s.cascade:
            groups, bucket = d.prefix_lens.shape[0], g.input_ids.shape[0]
            # Real groups, then each padded row a group of its own (prefix length 0), then empty groups. One group
            # holding all padded rows could outgrow the key's group-size bucket (the grid's row tiles), and rows
            # past the tiles would never be written. groups + (bucket - n) <= bucket: the buffer has room.
            s.group_starts[:groups + 1].copy_(d.group_starts)
            s.group_starts[groups + 1:groups + 1 + bucket - n].copy_(
                torch.arange(n + 1, bucket + 1, dtype=torch.int32, device=self.device))
            s.group_starts[groups + 1 + bucket - n:].fill_(bucket)
            s.prefix_lens.zero_()
            s.prefix_lens[:groups].copy_(d.prefix_lens)
            s.prefix_block_tables.fill_(-1)
            s.prefix_block_tables[:groups, :d.prefix_block_tables.shape[1]].copy_(d.prefix_block_tables)


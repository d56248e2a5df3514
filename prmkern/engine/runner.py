"""The model runner: owns the KV cache tensors, turns a scheduled step into model inputs and attention metadata,
runs the model and returns the logits of the rows that sample.

Decode steps group sequences by the leading blocks they share (the blocks with more than one reference, i.e. a
prompt prefilled once and forked into chains); the backend reads each group's shared prefix once for all its chains.
On CUDA with the Triton backend, decode steps replay captured CUDA graphs (prmkern/engine/cuda_graphs.py) unless
`enforce_eager`. On the CPU, decode GEMMs run prmkern's C++ kernels with the "cpp" backend (any dtype), or read
MKL-packed weights with the torch backend in fp32 (prmkern/models/packed_gemm.py). Knows
nothing of sampling or stopping.
"""
from __future__ import annotations

import numpy as np
import torch

from prmkern.attention import AttentionMetadata, DecodeMetadata, PrefillMetadata, get_backend
from prmkern.engine.block_manager import BlockManager
from prmkern.config import EngineConfig
from prmkern.engine.cpu_malloc import keep_freed_memory
from prmkern.engine.cuda_graphs import DecodeGraphs
from prmkern.models import DecoderForCausalLM, ForwardContext
from prmkern.models.loader import k_major_weights
from prmkern.models.decode_panels import attach_panels
from prmkern.models.packed_gemm import Linear, PackedGemm
from prmkern.engine.scheduler import ScheduledSeq, SchedulerOutput


def kv_block_bytes(model: DecoderForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    spec = model.spec
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * torch.finfo(dtype).bits // 8


def _padded(rows: list[list[int]], device: torch.device, width: int | None = None) -> torch.Tensor:
    """int32 [len(rows), width] padded with -1."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out).to(device)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: DecoderForCausalLM, num_blocks: int, block_manager: BlockManager,
                 max_model_len: int | None = None):
        self.config = config
        self.model = model
        self.block_manager = block_manager
        self.backend = get_backend(config.attention_backend)
        if config.device.type == "cpu":
            keep_freed_memory()  # a prefill's temporaries reuse freed pages instead of faulting in new ones
        spec = model.spec
        shape = (num_blocks, config.block_size, spec.num_kv_heads, spec.head_dim)
        # On the CPU the torch and C++ backends read only slots inside a sequence's length (padded decode entries
        # point at the row's newest token), so the pool is left uninitialised: torch.empty reserves it and the
        # operating system commits pages as blocks are first written. Other backends may multiply never-written
        # slots by zero probabilities, so there it is zeroed (a NaN there would poison the row).
        alloc = torch.empty if config.device.type == "cpu" and self.backend.uninitialized_kv_ok else torch.zeros
        self.kv_caches = [(alloc(shape, dtype=config.dtype, device=config.device),
                           alloc(shape, dtype=config.dtype, device=config.device))
                          for _ in range(spec.num_layers)]
        self.max_model_len = max_model_len or spec.max_position_embeddings
        # Decode steps from CUDA graphs: on CUDA with a backend that can be captured (Triton) unless enforce_eager.
        self.graphs: DecodeGraphs | None = None
        if config.device.type == "cuda" and self.backend.cuda_graphs and not config.enforce_eager:
            self.graphs = self.make_graphs("cuda")
        self.panel_bytes = 0  # memory held by column-panel copies of the weights (the cpp backend)
        self.packed_gemm = self._cpu_weight_path() if config.device.type == "cpu" else None

    def _cpu_weight_path(self) -> PackedGemm | None:
        """CPU GEMMs: with a backend on the C++ kernels (`cpu_kernels`: "cpp") the model gets them
        (`use_cpu_kernels`): every decode GEMM runs in C++ (any dtype), on a column-panel copy of the weight where
        `packed_gemm_bytes` holds one (prmkern/models/decode_panels.py), else on the checkpoint's [out, in] weight,
        and decode steps may run each layer in one call (prmkern/models/fused_layer.py). Otherwise, in fp32, the
        weights are stored k-major and decode GEMMs read MKL-packed copies (prmkern/models/packed_gemm.py; inactive
        with a zero budget)."""
        linears = [m for m in self.model.modules() if isinstance(m, Linear)]
        ops = getattr(self.backend, "ops", None) if self.backend.cpu_kernels else None
        self.model.use_cpu_kernels(ops)
        if ops is not None:
            self.panel_bytes = attach_panels(linears, self.config.packed_gemm_bytes, bool(ops.bf16_dot()),
                                             ops.cpu_isa())
            return None
        if self.config.dtype == torch.float32:
            k_major_weights(self.model)
        return PackedGemm(self.model, self.config.packed_gemm_bytes)

    def make_graphs(self, mode: str) -> DecodeGraphs:
        """The decode-graph store over this runner's model and caches (mode 'eager' tests the logic on a CPU)."""
        from prmkern.kernels.paged_decode import num_splits_rule

        return DecodeGraphs(forward=self._forward_logits, max_batch=min(self.config.max_graph_batch,
                                                                        self.config.max_num_seqs),
                            max_model_len=self.max_model_len, block_size=self.config.block_size,
                            num_kv_heads=self.model.spec.num_kv_heads, device=self.config.device,
                            splits_rule=num_splits_rule, mode=mode)

    def _forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata) -> torch.Tensor:
        """float32 logits [num_tokens, vocab] of every row (the decode step that graphs capture)."""
        ctx = ForwardContext(self.backend, meta, self.kv_caches, self.model.cos_sin_cache)
        return self.model.compute_logits(self.model(input_ids, positions, ctx))

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> torch.Tensor:
        """Runs one step; returns float32 logits [num_sampling_rows, vocab] in the order of the scheduled rows that
        sample. Reorders `step.scheduled` for decode (rows grouped by shared prefix)."""
        if step.copies:
            self._copy_blocks(step.copies)
        if step.is_prefill:
            input_ids, positions, meta, rows = self._prepare_prefill(step.scheduled)
        else:
            input_ids, positions, meta, rows = self._prepare_decode(step)
            if self.packed_gemm is not None:
                self.packed_gemm.prepare(input_ids.shape[0])
            if self.graphs is not None:
                cascade = bool(self.backend.shared_groups(meta.decode))
                logits = self.graphs.run(input_ids, positions, meta, cascade)
                if logits is not None:
                    return logits
        ctx = ForwardContext(self.backend, meta, self.kv_caches, self.model.cos_sin_cache)
        hidden = self.model(input_ids, positions, ctx)
        return self.model.compute_logits(hidden if rows is None else hidden[rows])

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in copies], device=self.config.device)
        dst = torch.tensor([d for _, d in copies], device=self.config.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def _prepare_prefill(self, scheduled: list[ScheduledSeq]):
        bs = self.config.block_size
        ids, pos, slots, cu, seq_lens, rows = [], [], [], [0], [], []
        for item in scheduled:
            seq = item.seq
            p = np.arange(item.start, item.end)
            table = np.asarray(seq.block_table, dtype=np.int64)
            s = table[p // bs] * bs + p % bs
            s[p < item.store_from] = -1
            ids.append(np.asarray(seq.token_ids[item.start:item.end], dtype=np.int64))
            pos.append(p)
            slots.append(s)
            cu.append(cu[-1] + item.num_new)
            seq_lens.append(item.end)
            if item.logits_from is not None:  # prompt_logprobs: every position from logits_from on
                rows.extend(range(cu[-1] - (item.end - item.logits_from), cu[-1]))
            elif item.samples:
                rows.append(cu[-1] - 1)
        dev = self.config.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            prefill=PrefillMetadata(
                cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                block_tables=_padded([it.seq.block_table for it in scheduled], dev),
                max_q_len=max(it.num_new for it in scheduled),
                max_seq_len=max(seq_lens)))
        return (torch.from_numpy(np.concatenate(ids)).to(dev), torch.from_numpy(np.concatenate(pos)).to(dev),
                meta, torch.tensor(rows, dtype=torch.int64, device=dev))

    def _shared_prefix(self, seq) -> tuple[int, ...]:
        """Leading blocks of the sequence's table that other running sequences also reference. Cached on the
        sequence until a reference count changes or its table grows: in steady decode it is not walked again."""
        bm = self.block_manager
        table = seq.block_table
        cached = seq.shared_prefix_cache
        if cached is not None and cached[0] == bm.sharing_epoch and cached[1] == len(table):
            return cached[2]
        n = 0
        while n < len(table) - 1 and bm.blocks[table[n]].ref_count > 1:
            n += 1
        key = tuple(table[:n])
        seq.shared_prefix_cache = (bm.sharing_epoch, len(table), key)
        return key

    def _prepare_decode(self, step: SchedulerOutput):
        bs = self.config.block_size
        groups: dict[tuple[int, ...], list[ScheduledSeq]] = {}
        for item in step.scheduled:
            groups.setdefault(self._shared_prefix(item.seq), []).append(item)
        ordered: list[ScheduledSeq] = []
        group_starts, prefix_lens, prefix_tables = [0], [], []
        for prefix, items in groups.items():
            shared = prefix if len(items) > 1 else ()
            ordered.extend(items)
            group_starts.append(len(ordered))
            prefix_lens.append(len(shared) * bs)
            prefix_tables.append(list(shared))
        step.scheduled[:] = ordered
        seq_lens, suffix_lens, suffix_tables, slots = [], [], [], []
        for g, plen in enumerate(prefix_lens):
            for item in ordered[group_starts[g]:group_starts[g + 1]]:
                seq = item.seq
                p = seq.num_tokens - 1
                seq_lens.append(seq.num_tokens)
                suffix_lens.append(seq.num_tokens - plen)
                suffix_tables.append(seq.block_table[plen // bs:])
                slots.append(seq.block_table[p // bs] * bs + p % bs)
        dev = self.config.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev), all_slots_valid=True,
            decode=DecodeMetadata(
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                block_tables=_padded([it.seq.block_table for it in ordered], dev),
                group_starts=torch.tensor(group_starts, dtype=torch.int32, device=dev),
                prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=dev),
                prefix_block_tables=_padded(prefix_tables, dev),
                suffix_lens=torch.tensor(suffix_lens, dtype=torch.int32, device=dev),
                suffix_block_tables=_padded(suffix_tables, dev),
                max_seq_len=max(seq_lens), max_prefix_len=max(prefix_lens), max_suffix_len=max(suffix_lens),
                group_starts_list=group_starts, prefix_lens_list=prefix_lens))
        input_ids = torch.tensor([it.seq.token_ids[-1] for it in ordered], dtype=torch.int64, device=dev)
        positions = torch.tensor([it.seq.num_tokens - 1 for it in ordered], dtype=torch.int64, device=dev)
        return input_ids, positions, meta, None  # every decode row samples

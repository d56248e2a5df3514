"""The Triton attention backend: the fast path on CUDA, the kernels of `prmkern.kernels` behind the backend seam.

Decode is cascade attention where sharing pays: for a group of chains with a shared prefix long enough and enough
chains (thresholds `min_chains`, `min_prefix_tokens`), one cascade_decode launch reads the prefix once for the whole
group, each chain's own suffix, and reduces and merges the float32 partial states in-kernel; when no group shares,
every row runs plain paged_decode over its full block table. Everything else maps one method to one kernel.

Importing this module needs triton but no GPU. On a CPU the kernels only run when TRITON_INTERPRET=1 was set before
triton was imported (tests do that); otherwise an EngineConfig naming it is refused before a model loads
(`unavailable_on`) and calls raise `TritonUnavailableError`. Does not capture CUDA graphs
(prmkern/engine/cuda_graphs.py does; a captured step's metadata fixes the path and launch sizes, see `_decode_fixed`) and
holds no per-step state.
"""
from __future__ import annotations

import torch

import prmkern.kernels as K
from prmkern.attention.backend import AttentionBackend, register_backend
from prmkern.attention.metadata import DecodeMetadata, PrefillMetadata


class TritonUnavailableError(RuntimeError):
    """The Triton kernels cannot run on this device (CPU tensors without TRITON_INTERPRET=1)."""


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    """int32 table [rows, w] -> [rows, width] padded with -1."""
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)


@register_backend
class TritonBackend(AttentionBackend):
    name = "triton"
    cuda_graphs = True

    def __init__(self, min_chains: int = 2, min_prefix_tokens: int = 128):
        """min_chains / min_prefix_tokens: a shared-prefix group takes the cascade path only with at least this many
        chains and prefix tokens. Defaults are to be set by GPU measurement (benchmarks/bench_shared_prefix_decode.py
        sweeps both); unmeasured: placeholders reasoned from prefix bytes saved vs the fused kernel's partial
        states (benchmarks/traffic_model.py)."""
        if not isinstance(min_chains, int) or min_chains < 1:
            raise ValueError(f"min_chains must be an int >= 1, got {min_chains!r}")
        if not isinstance(min_prefix_tokens, int) or min_prefix_tokens < 1:
            raise ValueError(f"min_prefix_tokens must be an int >= 1, got {min_prefix_tokens!r}")
        self.min_chains = min_chains
        self.min_prefix_tokens = min_prefix_tokens

    @classmethod
    def unavailable_on(cls, device: torch.device) -> str | None:
        if device.type == "cuda" or K.interpreted():
            return None
        return (f"the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before triton is imported to run "
                f"them on the CPU; got device {device}. Use the 'cpp' or 'torch' backend there")

    @staticmethod
    def _check_device(t: torch.Tensor) -> None:
        if t.device.type != "cuda" and not K.interpreted():
            raise TritonUnavailableError(
                f"Triton kernels got {t.device} tensors but were compiled for a GPU; on a CPU set TRITON_INTERPRET=1 "
                f"before importing triton, or use the 'torch' backend")

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, all_valid=False):
        self._check_device(key)
        K.store_kv(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)

    def prefill(self, q, k_cache, v_cache, meta: PrefillMetadata, scale):
        self._check_device(q)
        return K.paged_prefill(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=meta.cu_seqlens_q,
                               seq_lens=meta.seq_lens, block_tables=meta.block_tables, scale=scale,
                               max_q_len=meta.max_q_len)

    def shared_groups(self, meta: DecodeMetadata) -> list[int]:
        """Groups that take the shared-prefix path (host lists only: no device sync)."""
        starts, plens = meta.group_starts_list, meta.prefix_lens_list
        return [g for g, plen in enumerate(plens)
                if plen > 0 and plen >= self.min_prefix_tokens and starts[g + 1] - starts[g] >= self.min_chains]

    def decode_states(self, q, k_cache, v_cache, meta: DecodeMetadata, scale,
                      out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode returning (out [B, Hq, D] in out_dtype, lse [B, Hq] float32), like TorchBackend.decode_states."""
        self._check_device(q)
        batch, num_heads, head_dim = q.shape
        out = torch.empty((batch, num_heads, head_dim), dtype=out_dtype, device=q.device)
        if meta.cascade is not None:  # a captured step: the path and every launch size are fixed
            return self._decode_fixed(q, k_cache, v_cache, meta, scale, out)
        shared = self.shared_groups(meta)
        if not shared:  # plain paged decode over each row's full KV
            return K.paged_decode(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=meta.block_tables,
                                  seq_lens=meta.seq_lens, scale=scale, max_seq_len=meta.max_seq_len, out=out)

        starts, plens = meta.group_starts_list, meta.prefix_lens_list
        taken = set(shared)
        if all(g in taken for g, plen in enumerate(plens) if plen > 0):
            # Every group with a prefix shares (the common case): the metadata's split is used as is.
            tables, lens, prefix_lens = meta.suffix_block_tables, meta.suffix_lens, meta.prefix_lens
        else:
            # Rows of groups left out attend their full KV in paged_decode and get an empty prefix state.
            row_full = torch.zeros(batch, dtype=torch.bool)
            for g, plen in enumerate(plens):
                if plen > 0 and g not in taken:
                    row_full[starts[g]:starts[g + 1]] = True
            row_full = row_full.to(q.device)
            width = max(meta.block_tables.shape[1], meta.suffix_block_tables.shape[1])
            tables = torch.where(row_full[:, None], _pad_cols(meta.block_tables, width),
                                 _pad_cols(meta.suffix_block_tables, width)).contiguous()
            lens = torch.where(row_full, meta.seq_lens, meta.suffix_lens).contiguous()
            prefix_lens = torch.tensor([plen if g in taken else 0 for g, plen in enumerate(plens)],
                                       dtype=torch.int32, device=q.device)

        max_group = max(starts[g + 1] - starts[g] for g in range(len(plens)))
        max_suffix = meta.max_suffix_len if lens is meta.suffix_lens else meta.max_seq_len
        return self._cascade(q, k_cache, v_cache, meta, scale, out, tables=tables, lens=lens, prefix_lens=prefix_lens,
                             max_group_size=max_group, max_prefix_len=max(plens[g] for g in shared),
                             max_suffix_len=max_suffix)

    def _decode_fixed(self, q, k_cache, v_cache, meta: DecodeMetadata, scale, out):
        """Decode whose launches depend on no value of this step (CUDA-graph capture): meta.cascade picks the path
        for all rows; meta.max_group_size and the host max lengths size the grid. Split counts: meta.num_splits for
        plain paged_decode; for the cascade (P, S) = (prefix_num_splits, num_splits) when both are given, else the
        cascade kernel's own rule applied to the fixed host ints (so the same at capture and replay)."""
        if not meta.cascade:
            return K.paged_decode(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=meta.block_tables,
                                  seq_lens=meta.seq_lens, scale=scale, num_splits=meta.num_splits, out=out)
        if meta.max_group_size is None:
            raise ValueError("a fixed cascade decode needs max_group_size")
        splits = None
        if meta.num_splits is not None and meta.prefix_num_splits is not None:
            splits = (meta.prefix_num_splits, meta.num_splits)
        return self._cascade(q, k_cache, v_cache, meta, scale, out, tables=meta.suffix_block_tables,
                             lens=meta.suffix_lens, prefix_lens=meta.prefix_lens, max_group_size=meta.max_group_size,
                             max_prefix_len=meta.max_prefix_len, max_suffix_len=meta.max_suffix_len, splits=splits)

    @staticmethod
    def _cascade(q, k_cache, v_cache, meta: DecodeMetadata, scale, out, *, tables, lens, prefix_lens,
                 max_group_size, max_prefix_len, max_suffix_len, splits=None):
        """One fused launch (kernels/cascade_decode.py): each group's prefix read once for all its chains, each
        row's suffix (or full KV) over `tables`/`lens`, split states reduced and merged in-kernel into `out`."""
        return K.cascade_decode(q=q, k_cache=k_cache, v_cache=v_cache, group_starts=meta.group_starts,
                                prefix_lens=prefix_lens, prefix_block_tables=meta.prefix_block_tables,
                                suffix_lens=lens, suffix_block_tables=tables, scale=scale,
                                max_group_size=max_group_size, max_prefix_len=max_prefix_len,
                                max_suffix_len=max_suffix_len, splits=splits, out=out)

    def decode(self, q, k_cache, v_cache, meta: DecodeMetadata, scale):
        return self.decode_states(q, k_cache, v_cache, meta, scale, out_dtype=q.dtype)[0]

    def rms_norm(self, x, weight, eps, residual=None):
        self._check_device(x)
        return K.rms_norm(x=x, weight=weight, eps=eps, residual=residual)

    def apply_rotary(self, q, k, positions, cos_sin_cache):
        self._check_device(q)
        return K.rotary(q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)

    def silu_and_mul(self, x):
        self._check_device(x)
        return K.silu_and_mul(x=x)

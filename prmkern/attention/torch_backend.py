"""The torch attention backend: the CPU default and the reference that the Triton kernels are tested against.

Reads K/V through block tables by gathering; no Python loop over tokens (prefill loops over sequences, decode over
shared-prefix groups). Softmax statistics are kept in float32 whatever the cache dtype.
Decode is cascade attention: each group's shared prefix is attended by all of the group's chains in one batched
product (the prefix K/V is read once per group, not once per chain), each chain's suffix in one padded batch,
and the two partial softmax states are merged by log-sum-exp (the Hydragen / FlashInfer-cascade decomposition).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prmkern.attention.backend import AttentionBackend, register_backend
from prmkern.attention.metadata import DecodeMetadata, PrefillMetadata

# torch's fused CPU attention kernel, which also returns the log-sum-exp (natural log) that the cascade merge needs
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def gather_kv_index(block_tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Flat cache slot of each of the first `length` tokens of each row: [rows, length] int64 (garbage past a row's
    own length; callers mask it)."""
    nblk = -(-length // block_size)
    bt = block_tables[:, :nblk].to(torch.int64).clamp_min(0)  # [rows, nblk]
    offs = torch.arange(block_size, device=bt.device)
    return (bt[:, :, None] * block_size + offs).reshape(bt.shape[0], -1)[:, :length]


@register_backend
class TorchBackend(AttentionBackend):
    name = "torch"
    uninitialized_kv_ok = True  # reads only slots inside a sequence's length (padded decode rows repeat the newest)

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, all_valid=False):
        num_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        if all_valid:  # decode: no boolean mask (which costs a nonzero() and two masked copies per layer)
            k_cache.view(-1, num_heads, head_dim)[slot_mapping] = key.to(k_cache.dtype)
            v_cache.view(-1, num_heads, head_dim)[slot_mapping] = value.to(v_cache.dtype)
            return
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        k_cache.view(-1, num_heads, head_dim)[slots] = key[keep].to(k_cache.dtype)
        v_cache.view(-1, num_heads, head_dim)[slots] = value[keep].to(v_cache.dtype)

    def prefill(self, q, k_cache, v_cache, meta: PrefillMetadata, scale):
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        out = torch.empty_like(q)
        cu = meta.cu_seqlens_q.tolist()
        seq_lens = meta.seq_lens.tolist()
        for s, seq_len in enumerate(seq_lens):  # one fused attention call per sequence
            q0, q1 = cu[s], cu[s + 1]
            q_len = q1 - q0
            if q_len == 0:
                continue
            idx = gather_kv_index(meta.block_tables[s:s + 1], block_size, seq_len)[0]  # [L]
            k = k_flat[idx].transpose(0, 1)[None]  # [1, Hkv, L, D]
            v = v_flat[idx].transpose(0, 1)[None]
            qs = q[q0:q1].transpose(0, 1)[None]  # [1, Hq, Tq, D]
            if q_len == seq_len:  # a fresh prompt: plain causal attention
                mask, causal = None, True
            else:  # new tokens after a cached prefix: query i sits at position seq_len - q_len + i
                qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
                mask, causal = torch.arange(seq_len, device=q.device)[None, :] <= qpos[:, None], False
            o = F.scaled_dot_product_attention(qs, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal,
                                               scale=scale, enable_gqa=True)
            out[q0:q1] = o[0].transpose(0, 1)
        return out

    def __init__(self) -> None:
        self._decode_cache: tuple[DecodeMetadata, tuple] | None = None

    def _decode_indices(self, meta: DecodeMetadata, block_size: int):
        """Gather indices for a decode step, computed once per step and reused by every layer: suffix slots
        idx [B, Ls], valid [B, 1, Ls], the additive mask bias [B, 1, 1, Ls] (0 / -inf), and per group its prefix
        slots (a slice when the prefix blocks are consecutive). Padded suffix entries of `idx` point at the row's
        own newest token (stored this step, so finite): masked by -inf, they cannot inject NaN from a stale slot."""
        if self._decode_cache is not None and self._decode_cache[0] is meta:
            return self._decode_cache[1]
        idx = gather_kv_index(meta.suffix_block_tables, block_size, meta.max_suffix_len)  # [B, Ls]
        pos = torch.arange(meta.max_suffix_len, device=idx.device)
        lens = meta.suffix_lens.to(torch.int64)
        valid2 = pos[None, :] < lens[:, None]  # [B, Ls]
        newest = idx.gather(1, (lens - 1).clamp_min(0)[:, None])  # [B, 1]
        idx = torch.where(valid2, idx, newest)
        bias = torch.zeros(valid2.shape, dtype=torch.float32, device=idx.device).masked_fill_(~valid2, float("-inf"))
        prefix_idx = {}
        for g, plen in enumerate(meta.prefix_lens_list):
            if plen:
                blocks = meta.prefix_block_tables[g, :plen // block_size].tolist()
                if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
                    prefix_idx[g] = slice(blocks[0] * block_size, (blocks[0] + len(blocks)) * block_size)  # a view
                else:
                    prefix_idx[g] = gather_kv_index(meta.prefix_block_tables[g:g + 1], block_size, plen)[0]
        self._decode_cache = (meta, (idx, valid2[:, None, :], bias[:, None, None, :], prefix_idx))
        return self._decode_cache[1]

    @staticmethod
    def _prefix_groups(meta: DecodeMetadata, prefix_idx: dict):
        """(first row, end row, chains, prefix slots) of each group with a shared prefix."""
        starts = meta.group_starts_list
        for g, plen in enumerate(meta.prefix_lens_list):
            if plen:
                yield starts[g], starts[g + 1], starts[g + 1] - starts[g], prefix_idx[g]

    def decode_states(self, q, k_cache, v_cache, meta: DecodeMetadata, scale):
        """Cascade decode, returning the merged float32 state (out [B, Hq, D], lse [B, Hq]).

        On the CPU in float32 each part is one call of torch's fused CPU attention (which returns its log-sum-exp):
        the suffixes of all chains in one padded batch, each group's prefix with all of the group's chains x query
        heads as one query block; the two states are merged by log-sum-exp. On the CPU a decode step costs its
        number of small ops more than its flops, and this takes about half as many per layer as the explicit
        products (`_decode_states_matmul`, used for other dtypes and devices)."""
        if _FLASH_CPU is None or q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
            return self._decode_states_matmul(q, k_cache, v_cache, meta, scale)
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        batch, num_heads, _ = q.shape
        group = num_heads // num_kv_heads
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        idx, _, bias, prefix_idx = self._decode_indices(meta, block_size)
        # The GQA group rides in the query-length dimension: [B, Hkv, G, D] against [B, Hkv, Ls, D].
        qs = q.reshape(batch, num_kv_heads, group, head_dim)
        out, lse = _FLASH_CPU(qs, k_flat[idx].transpose(1, 2), v_flat[idx].transpose(1, 2), 0.0, False,
                              attn_mask=bias, scale=scale)  # [B, Hkv, G, D], [B, Hkv, G]
        for r0, r1, n, pidx in self._prefix_groups(meta, prefix_idx):
            qp = qs[r0:r1].transpose(0, 1).reshape(1, num_kv_heads, n * group, head_dim)
            po, pl = _FLASH_CPU(qp, k_flat[pidx].transpose(0, 1)[None], v_flat[pidx].transpose(0, 1)[None], 0.0,
                                False, scale=scale)  # [1, Hkv, n * G, D], [1, Hkv, n * G]
            po = po[0].reshape(num_kv_heads, n, group, head_dim).transpose(0, 1)  # [n, Hkv, G, D]
            pl = pl[0].reshape(num_kv_heads, n, group).transpose(0, 1)  # [n, Hkv, G]
            sl = lse[r0:r1]
            m = torch.maximum(sl, pl)
            ws, wp = (sl - m).exp_(), (pl - m).exp_()
            total = ws + wp
            out[r0:r1] = (out[r0:r1] * ws[..., None] + po * wp[..., None]) / total[..., None]
            lse[r0:r1] = total.log_().add_(m)
        return out.reshape(batch, num_heads, head_dim), lse.reshape(batch, num_heads)

    def _decode_states_matmul(self, q, k_cache, v_cache, meta: DecodeMetadata, scale):
        """Cascade decode by explicit products (any dtype and device), returning (out [B, Hq, D], lse [B, Hq]) in
        float32.

        Two partial softmax states per chain, its suffix's and its group's prefix's, merged through their running
        maximum and sums (the log-sum-exp merge, written out so each part is exponentiated once): on the CPU the
        number of small tensor ops per layer, not flops, is what decode costs."""
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        batch, num_heads, _ = q.shape
        group = num_heads // num_kv_heads
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        qs = q.float().reshape(batch, num_kv_heads, group, head_dim) * scale  # [B, Hkv, G, D]
        idx, valid, _, prefix_idx = self._decode_indices(meta, block_size)

        # Each chain's own suffix, all chains in one padded batch: scores [B, Hkv, G, Ls].
        # Padded entries of idx read the row's newest token (finite), so 0-probability keys contribute 0.
        v_suffix = v_flat[idx].float()  # [B, Ls, Hkv, D]
        s = torch.matmul(qs, k_flat[idx].float().permute(0, 2, 3, 1))
        s.masked_fill_(~valid[:, None], float("-inf"))
        m = s.amax(dim=-1)  # [B, Hkv, G] running maximum over both parts

        # Each group's shared prefix: all of the group's chains x query heads against it in one product.
        prefixes = []
        for r0, r1, n, pidx in self._prefix_groups(meta, prefix_idx):  # pidx: [Lp] indices or a slice
            qp = qs[r0:r1].permute(1, 0, 2, 3).reshape(num_kv_heads, n * group, head_dim)
            sp = torch.matmul(qp, k_flat[pidx].float().permute(1, 2, 0))  # [Hkv, n * G, Lp]
            mp = sp.amax(dim=-1).reshape(num_kv_heads, n, group).permute(1, 0, 2)  # [n, Hkv, G]
            m[r0:r1] = torch.maximum(m[r0:r1], mp)
            prefixes.append((r0, r1, n, sp, v_flat[pidx]))

        m.nan_to_num_(neginf=0.0)  # a row without keys: exp(-inf - 0) = 0 everywhere
        p = s.sub_(m[..., None]).exp_()
        total = p.sum(dim=-1)  # [B, Hkv, G]
        out = torch.matmul(p, v_suffix.permute(0, 2, 1, 3))  # [B, Hkv, G, D]
        for r0, r1, n, sp, vp in prefixes:
            pp = sp.sub_(m[r0:r1].permute(1, 0, 2).reshape(num_kv_heads, n * group, 1)).exp_()
            total[r0:r1] += pp.sum(dim=-1).reshape(num_kv_heads, n, group).permute(1, 0, 2)
            po = torch.matmul(pp, vp.float().permute(1, 0, 2))  # [Hkv, n * G, D]
            out[r0:r1] += po.reshape(num_kv_heads, n, group, head_dim).permute(1, 0, 2, 3)
        out /= total.clamp_min(1e-30)[..., None]
        lse = total.log_().add_(m)
        return out.reshape(batch, num_heads, head_dim), lse.reshape(batch, num_heads)

    def decode(self, q, k_cache, v_cache, meta: DecodeMetadata, scale):
        return self.decode_states(q, k_cache, v_cache, meta, scale)[0].to(q.dtype)

"""Rotary position embedding tables: default RoPE and the llama3 frequency scaling, read from either config dialect.

Produces the cos/sin cache [max_positions, head_dim] float32 laid out as [cos | sin] over head_dim/2 frequencies,
which every attention backend's `apply_rotary` reads. It does not apply the rotation (the backends do).
"""
from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Normalise the two config.json dialects: transformers >= 5 writes `rope_parameters` (theta and type inside);
    older checkpoints have top-level `rope_theta` and `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "rope_theta" not in params:
        params["rope_theta"] = config.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    params["rope_type"] = rope_type
    return params


def inverse_frequencies(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, with the configured scaling applied."""
    theta = float(params["rope_theta"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def cos_sin_cache(head_dim: int, max_positions: int, params: dict[str, Any],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_positions, head_dim] float32 = [cos | sin] of position * inverse frequency."""
    inv_freq = inverse_frequencies(head_dim, params)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.int64).float(), inv_freq)  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)

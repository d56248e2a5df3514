"""Structural promises of the attention design, asserted on the traffic model (benchmarks/traffic_model.py), which
applies the kernels' own split rules: bytes moved, partial-state bytes, launches per attention layer."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.traffic_model import (GOAL, GPUS, DecodeShape, achieved, cascade_fused,  # noqa: E402
                                      cascade_three_launches, paged_decode_model, paged_unshared)


def test_goal_shape_cascade_near_unique_kv():
    """8K prefix x 64 chains x 256 suffix (ThinkPRM-1.5B, bf16, H200): the fused cascade moves <= 1.3x the unique
    KV bytes in one launch, its partial states <= 10% of its KV bytes; the unshared baseline moves > 20x."""
    m = cascade_fused(GOAL)
    assert m["launches"] == 1
    assert m["bytes_over_unique_kv"] <= 1.3, m
    assert m["state_bytes_written"] <= 0.10 * m["kv_bytes"], m
    assert m["prefix_splits"] >= 2 and m["ctas"] >= GPUS["H200"].sms, m  # the prefix still fills the GPU
    assert paged_unshared(GOAL)["total_bytes"] > 20 * m["unique_kv_bytes"]
    old = cascade_three_launches(GOAL)
    assert old["launches"] >= 3 and old["state_bytes_written"] > 0.5 * old["kv_bytes"]  # what the issue found


@pytest.mark.parametrize("prefix_len,chains,suffix_len", [(1024, 4, 64), (2048, 32, 256), (8192, 16, 1024),
                                                           (4096, 128, 128), (16384, 64, 512)])
def test_fused_cascade_budget_across_shapes(prefix_len, chains, suffix_len):
    """Across shapes where sharing pays, the state budget holds and the fused kernel is within 1.3x of unique KV."""
    m = cascade_fused(DecodeShape(prefix_len, chains, suffix_len))
    assert m["launches"] == 1
    assert m["state_bytes_written"] <= 0.10 * m["kv_bytes"] + 2 * chains * 12 * 516, m  # >= 2 slots always
    assert m["bytes_over_unique_kv"] <= 1.3, m


def test_paged_decode_model_and_achieved():
    m = paged_decode_model(32, 4096)
    kv = 32 * 4096 * 2 * 128 * 2 * 2
    assert m["kv_bytes"] == kv and m["total_bytes"] >= kv
    # a measured time exactly at the floor is 100% of it, and reads the model's bytes at the reachable bandwidth
    a = achieved(m, m["floor_us"] / 1e3)
    assert a["pct_of_floor"] == pytest.approx(100.0, abs=0.2)
    assert a["achieved_gbps"] == pytest.approx(GPUS["H200"].dram_gbps * 0.9, rel=0.01)

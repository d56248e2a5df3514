"""Every Triton kernel compiles ahead of time for sm_90 and sm_80 at the engine's shapes, without a GPU, within the
resources its launch configuration intends: no register spills in 16-bit dtypes (nor, since their tiles were cut,
in fp32), and at least the resident warps per SM each kernel's design relies on (from the cubin's registers and
the kernel's shared memory).

The compile runs in a subprocess (benchmarks/aot_compile.py --subset ci), because this test session imports triton
under TRITON_INTERPRET=1; it is run once per session and its table shared by the tests below. Skips only where
Triton's CUDA backend (compiler, ptxas) is absent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Resident warps per SM each kernel needs at its intended occupancy (design, not measurement; CTAs per SM from
# registers and shared memory x warps per CTA): the decode kernels hide memory latency with >= 8 warps (two 4-warp
# CTAs, or one 8-warp CTA before sm_90); the 128-row shared-prefix tile and the prefill tile are compute tiles that
# need one CTA; elementwise kernels and the merge need many.
MIN_WARPS_PER_SM = {"_paged_decode_kernel": 8, "_shared_prefix_decode_kernel": 4, "_cascade_decode_kernel": 8,
                    "_paged_prefill_kernel": 4, "_merge_states_kernel": 16, "_rms_norm_kernel": 16,
                    "_rotary_kernel": 16, "_silu_and_mul_kernel": 16, "_store_kv_kernel": 16}
KERNELS = set(MIN_WARPS_PER_SM)


@pytest.fixture(scope="session")
def aot_table(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "aot_compile.py"), "--subset", "ci",
                           "--arch", "90", "--arch", "80", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:  # the script's "no CUDA backend" exit
        pytest.skip(f"AOT compile skipped: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_both_targets(aot_table):
    attention = {"_paged_decode_kernel", "_shared_prefix_decode_kernel", "_cascade_decode_kernel",
                 "_paged_prefill_kernel", "_merge_states_kernel"}
    for target, want in (("sm_90", KERNELS), ("sm_80", attention)):  # sm_80: attention only (the CI budget)
        built = {r["kernel"] for r in aot_table["rows"] if r["target"] == target}
        assert built == want, f"{target}: missing {want - built}, unexpected {built - want}"
    shapes = {(r["dtype"], r["head_dim"], r["gqa"]) for r in aot_table["rows"] if r["kernel"] == "_paged_decode_kernel"}
    assert {(dt, d) for dt, d, _ in shapes} == {(dt, d) for dt in ("bfloat16", "float16", "float32")
                                                 for d in (64, 128)}


def test_no_spills(aot_table):
    spills = [(r["target"], r["kernel"], r["call"], r["dtype"], r["head_dim"], r["gqa"], r["spill_stores"])
              for r in aot_table["rows"] if r["spill_stores"] > 0 or r["stack"] > 0]
    assert not spills, f"register spills: {spills}"


def test_occupancy_meets_design(aot_table):
    low = [(r["target"], r["kernel"], r["call"], r["dtype"], r["head_dim"], r["registers"], r["shared_bytes"],
            r["ctas_per_sm"], r["num_warps"]) for r in aot_table["rows"]
           if r["ctas_per_sm"] * r["num_warps"] < MIN_WARPS_PER_SM[r["kernel"]]]
    assert not low, f"below the intended resident warps per SM: {low}"
    for r in aot_table["rows"]:
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] <= 227 * 1024, r


def test_occupancy_arithmetic():
    """The occupancy rule itself, on numbers worked by hand (H200: 64K registers, 228 KB shared memory per SM)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.traffic_model import GPUS, occupancy
    h200 = GPUS["H200"]
    assert occupancy(h200, 96, 4, 38912) == 5  # regs: 96*32=3072/warp -> 65536 // 12288 = 5; smem: 233472 // 39936 = 5
    assert occupancy(h200, 128, 8, 0) == 2  # 65536 // (4096 * 8)
    assert occupancy(h200, 32, 4, 100_000) == 2  # shared memory bound: 233472 // 101024
    assert occupancy(h200, 255, 4, 0) == 2  # 255 regs round up to 8192 per warp -> 65536 // 32768


def test_resident_ctas_data_matches_the_compiled_kernels(aot_table):
    """The split rules' occupancy data (kernels/paged_decode.py RESIDENT_CTAS) is what the compiled kernels give."""
    from prmkern.kernels.paged_decode import RESIDENT_CTAS
    checked = 0
    for r in aot_table["rows"]:
        name = {"_paged_decode_kernel": "paged_decode", "_cascade_decode_kernel": "cascade_decode"}.get(r["kernel"])
        if name is None or r["dtype"] == "float32" or (name == "cascade_decode" and "chains=64" not in r["call"]):
            continue
        arch = int(r["target"].removeprefix("sm_"))
        assert r["ctas_per_sm"] == RESIDENT_CTAS[arch][name][r["head_dim"]], r
        checked += 1
    assert checked >= 6

"""Compile every Triton kernel ahead of time for an NVIDIA GPU, without one, and report its resources.

Each kernel is compiled through its own public launcher (the same code path, argument values and launch constants
as the engine's call), with a stub "active driver" that reports a CUDA target (sm_90 or sm_80), so the JIT's
specialisation (16-byte aligned pointers, ints divisible by 16 or equal to 1) matches a real launch; the launch
itself is replaced by a warm-up compile. Registers and spills come from `ptxas -v` (the one in the Triton wheel)
on the generated PTX, shared memory from the compiled kernel's metadata; CTAs per SM from traffic_model.occupancy.

Must run in a process where TRITON_INTERPRET is unset (the interpreter replaces the JIT functions at import).

    python benchmarks/aot_compile.py --arch 90 --out benchmarks/results/aot_compile_sm90.json   # full grid
    python benchmarks/aot_compile.py --subset ci --arch 90 --arch 80 --out /tmp/aot.json      # the CI subset
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HEAD_DIMS = (64, 128)
GQA = (1, 4, 6, 8)
NUM_KV_HEADS = 2  # R1-Distill-Qwen-1.5B (ThinkPRM / GenPRM-1.5B): 12 query heads, 2 KV heads, head dim 128
BLOCK_SIZE = 16
DTYPES = ("bfloat16", "float16", "float32")


class _StubDriver:
    """Just enough of triton's active driver for the JIT to compile (not launch) for `capability`."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


def cuda_backend_available() -> str | None:
    """None when Triton's CUDA backend (compiler + ptxas) is importable, else why not."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set (the interpreter replaces the JIT functions)"
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means no CUDA backend
        return f"triton's CUDA backend is not importable: {e!r}"
    return None


def _ptxas_path(capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        return get_ptxas(capability).path  # triton >= 3.7 takes the arch
    except TypeError:
        return get_ptxas().path


def _resources(ptx: str, cubin: bytes, capability: int) -> dict[str, int]:
    """Registers and stack (spill space) of the cubin Triton built (cuobjdump --dump-resource-usage), and the spill
    stores/loads in bytes (ptxas -v re-run on Triton's PTX, same ptxas; ptxas prints them only while compiling)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    ptxas = _ptxas_path(capability)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        (Path(tmp) / "k.cubin").write_bytes(cubin)
        cmd = [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(capability)}", str(Path(tmp) / "k.ptx"), "-o",
               str(Path(tmp) / "k.o")]
        # Triton >= 3.7 passes --regAllocOptLevel=2 (a ptxas 13 workaround); older ptxas may not know it.
        proc = subprocess.run(cmd[:2] + ["--regAllocOptLevel=2"] + cmd[2:], capture_output=True, text=True)
        if proc.returncode != 0:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        log = proc.stderr + proc.stdout
        usage = subprocess.run([str(Path(ptxas).with_name("cuobjdump")), "--dump-resource-usage",
                                str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True).stdout

    def grab(pattern: str, text: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0
    return {"registers": grab(r"REG:(\d+)", usage), "stack": grab(r"STACK:(\d+)", usage),
            "spill_stores": grab(r"(\d+) bytes spill stores", log),
            "spill_loads": grab(r"(\d+) bytes spill loads", log)}


class _Recorder:
    """Replaces JITFunction.run by a warm-up compile and records each compiled kernel with its launch."""

    def __init__(self):
        self.compiled: list[tuple[str, dict, object]] = []

    def __enter__(self):
        from triton.runtime.jit import JITFunction
        self._orig = JITFunction.run
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = rec._orig(fn, *args, grid=grid, warmup=True, **kwargs)
            consts = {k: v for k, v in kwargs.items() if isinstance(v, (int, str, bool))}
            rec.compiled.append((fn.fn.__name__, consts, kernel))
            return kernel
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction
        JITFunction.run = self._orig


def _attention_calls(dtype_name: str, head_dim: int, gqa: int) -> list[tuple[str, Callable[[], None]]]:
    """(label, launch) for each attention launcher at one shape; CPU tensors (never read: compile only)."""
    import torch

    from prmkern.kernels import cascade_decode, merge_states, paged_decode, paged_prefill, shared_prefix_decode
    dtype = getattr(torch, dtype_name)
    hq = NUM_KV_HEADS * gqa
    cache = torch.empty((64, BLOCK_SIZE, NUM_KV_HEADS, head_dim), dtype=dtype)
    i32 = lambda *s: torch.zeros(s, dtype=torch.int32)  # noqa: E731
    batch, width = 64, 32

    def decode():  # 4 splits: the split kernel and its reduce
        q = torch.empty((batch, hq, head_dim), dtype=dtype)
        paged_decode(q=q, k_cache=cache, v_cache=cache, block_tables=i32(batch, width), seq_lens=i32(batch),
                     scale=0.1, num_splits=4, out=torch.empty((batch, hq, head_dim)))

    def prefix(chains: int):
        def call():  # one group of `chains` chains (the row tile grows with chains x gqa), 2 splits + reduce
            q = torch.empty((chains, hq, head_dim), dtype=dtype)
            shared_prefix_decode(q=q, k_cache=cache, v_cache=cache, group_starts=torch.tensor([0, chains],
                                 dtype=torch.int32), prefix_lens=i32(1), prefix_block_tables=i32(1, width),
                                 scale=0.1, max_group_size=chains, num_splits=2,
                                 out=torch.empty((chains, hq, head_dim)))
        return call

    def cascade(chains: int):
        def call():  # one group of `chains` chains plus one lone row, 3 prefix and 2 suffix splits
            q = torch.empty((chains + 1, hq, head_dim), dtype=dtype)
            cascade_decode(q=q, k_cache=cache, v_cache=cache, group_starts=torch.tensor([0, chains, chains + 1],
                           dtype=torch.int32), prefix_lens=i32(2), prefix_block_tables=i32(2, width),
                           suffix_lens=i32(chains + 1), suffix_block_tables=i32(chains + 1, width), scale=0.1,
                           max_group_size=chains, splits=(3, 2), counters=i32((chains + 1) * hq))
        return call

    def merge():
        a = torch.empty((batch, hq, head_dim))
        la = torch.empty((batch, hq))
        merge_states(out_a=a, lse_a=la, out_b=a, lse_b=la, out=torch.empty((batch, hq, head_dim), dtype=dtype))

    def prefill():
        q = torch.empty((512, hq, head_dim), dtype=dtype)
        paged_prefill(q=q, k_cache=cache, v_cache=cache, cu_seqlens_q=torch.tensor([0, 256, 512], dtype=torch.int32),
                      seq_lens=i32(2), block_tables=i32(2, width), scale=0.1, max_q_len=256)

    return [("paged_decode", decode), ("shared_prefix_decode[chains=2]", prefix(2)),
            ("shared_prefix_decode[chains=64]", prefix(64)),
            ("cascade_decode[chains=2]", cascade(2)), ("cascade_decode[chains=64]", cascade(64)),
            ("merge_states", merge), ("paged_prefill", prefill)]


def _elementwise_calls(dtype_name: str) -> list[tuple[str, Callable[[], None]]]:
    import torch

    from prmkern.kernels import rms_norm, rotary, silu_and_mul, store_kv
    dtype = getattr(torch, dtype_name)
    hidden, inter, hq, hkv, d, t = 1536, 8960, 12, 2, 128, 64
    return [
        ("rms_norm", lambda: rms_norm(x=torch.empty((t, hidden), dtype=dtype), weight=torch.empty(hidden, dtype=dtype),
                                      eps=1e-6, residual=torch.empty((t, hidden), dtype=dtype))),
        ("silu_and_mul", lambda: silu_and_mul(x=torch.empty((t, 2 * inter), dtype=dtype))),
        ("rotary", lambda: rotary(q=torch.empty((t, hq, d), dtype=dtype), k=torch.empty((t, hkv, d), dtype=dtype),
                                  positions=torch.zeros(t, dtype=torch.int64),
                                  cos_sin_cache=torch.empty((4096, d), dtype=torch.float32))),
        ("store_kv", lambda: store_kv(key=torch.empty((t, hkv, d), dtype=dtype), value=torch.empty((t, hkv, d),
                                      dtype=dtype), k_cache=torch.empty((64, 16, hkv, d), dtype=dtype),
                                      v_cache=torch.empty((64, 16, hkv, d), dtype=dtype),
                                      slot_mapping=torch.zeros(t, dtype=torch.int64))),
    ]


def _clear_jit_caches() -> None:
    import importlib

    from triton.runtime.jit import JITFunction
    for mod in ("merge_states", "paged_decode", "paged_prefill", "rms_norm", "rotary", "shared_prefix_decode",
                "silu_and_mul", "store_kv"):
        for obj in vars(importlib.import_module(f"prmkern.kernels.{mod}")).values():
            if isinstance(obj, JITFunction):
                obj.device_caches.clear()


def configs(subset: str, capability: int = 90) -> list[tuple[str, int, int]]:
    """(dtype, head_dim, gqa) attention shapes. 'full': every combination; 'ci' on sm_90: each dtype at both head
    dims with GQA 1 and 6 (the engine's 1.5B shape); 'ci' on sm_80: three representative shapes (the CI budget)."""
    if subset == "full":
        return [(dt, d, g) for dt in DTYPES for d in HEAD_DIMS for g in GQA]
    if subset == "ci":
        if capability == 80:
            return [("bfloat16", 128, 6), ("float16", 64, 1), ("float32", 128, 6)]
        return [(dt, d, g) for dt in DTYPES for d in HEAD_DIMS for g in (1, 6)]
    raise ValueError(f"subset={subset!r}; accepted: 'full', 'ci'")


def compile_all(capability: int, subset: str, dtypes: tuple[str, ...] = DTYPES) -> list[dict]:
    """Compile every kernel for `capability` (90, 80); one row per distinct compiled kernel."""
    import triton
    from triton.runtime.driver import driver

    from benchmarks.traffic_model import GPUS, occupancy
    gpu = {90: "H200", 80: "A100"}[capability]
    previous = driver._active  # noqa: SLF001 - restored below (reset_active would look for a real driver)
    driver.set_active(_StubDriver(capability))
    _clear_jit_caches()  # each JIT function caches its target per device at first use
    rows, seen = [], set()
    try:
        calls = [((dt, d, g), label, f) for dt, d, g in configs(subset, capability) if dt in dtypes
                 for label, f in _attention_calls(dt, d, g)]
        calls += [((dt, None, None), label, f) for dt in dtypes if subset == "full" or capability == 90
                  for label, f in _elementwise_calls(dt)]
        for (dt, d, g), label, launch in calls:
            with _Recorder() as rec:
                launch()
            for name, consts, kernel in rec.compiled:
                key = (name, kernel.hash)
                if key in seen:
                    continue
                seen.add(key)
                res = _resources(kernel.asm["ptx"], kernel.asm["cubin"], capability)
                md = kernel.metadata
                rows.append({
                    "kernel": name, "call": label, "dtype": dt, "head_dim": d, "gqa": g, "block_size": BLOCK_SIZE,
                    "constexprs": {k: v for k, v in consts.items() if k.isupper()},
                    "num_warps": md.num_warps, "num_stages": md.num_stages, "shared_bytes": md.shared, **res,
                    "ctas_per_sm": occupancy(GPUS[gpu], res["registers"], md.num_warps, md.shared),
                    "target": f"sm_{capability}", "triton": triton.__version__,
                })
    finally:
        driver._active = previous  # noqa: SLF001
        _clear_jit_caches()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", choices=(80, 90), help="compute capability (repeatable)")
    ap.add_argument("--subset", default="full", choices=("full", "ci"))
    ap.add_argument("--dtype", action="append", choices=DTYPES, help="restrict to these dtypes (repeatable)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    why = cuda_backend_available()
    if why:
        print(f"SKIP: {why}", file=sys.stderr)
        return 3
    t0 = time.time()
    archs = args.arch or [90]
    if len(archs) > 1:  # one process per target: triton caches its ptxas / PTX version choice per process
        rows = []
        for cap in archs:
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / "part.json"
                cmd = [sys.executable, __file__, "--arch", str(cap), "--subset", args.subset, "--out", str(part)]
                cmd += [x for dt in (args.dtype or []) for x in ("--dtype", dt)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    return proc.returncode
                rows += json.loads(part.read_text())["rows"]
    else:
        rows = compile_all(archs[0], args.subset, tuple(args.dtype or DTYPES))
    import triton
    doc = {"triton": triton.__version__, "subset": args.subset, "seconds": round(time.time() - t0, 1),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip() or None,
           "rows": rows}
    for r in rows:
        print(f"{r['target']} {r['kernel']:<30} {r['call']:<32} {r['dtype']:<9} D={r['head_dim']} G={r['gqa']} "
              f"regs={r['registers']:>3} spill={r['spill_stores']:>5} smem={r['shared_bytes']:>6} "
              f"ctas/SM={r['ctas_per_sm']}", file=sys.stderr)
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({"rows": len(rows), "seconds": doc["seconds"], "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

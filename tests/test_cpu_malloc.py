"""A CPU engine keeps freed memory in the process (prmkern/engine/cpu_malloc.py): after the first LLM on the CPU, a
large block freed and allocated again is the same resident pages, not a fresh mmap that faults in every page; with
PRMKERN_CPU_MALLOC=default malloc is left as glibc sets it. Each case runs in a fresh interpreter (the setting is
process-wide), counting minor page faults around the second allocation of a 64 MiB tensor."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, resource, sys, torch
from prmkern import LLM
llm = LLM(sys.argv[1], dtype="float32", device="cpu")
def faults_of_a_fresh_block():
    x = torch.empty(16 << 20, dtype=torch.float32)  # 64 MiB
    x.fill_(1.0)
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty(16 << 20, dtype=torch.float32)
    y.fill_(2.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
from prmkern.engine import cpu_malloc
print(json.dumps({"applied": cpu_malloc.keep_freed_memory(), "faults": faults_of_a_fresh_block()}))
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting is glibc's mallopt")


def _run(model_dir: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, model_dir], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults(qwen2_dir):
    r = _run(qwen2_dir)
    assert r["applied"] is True
    # 64 MiB is 16,384 pages of 4 KiB; reused memory faults in none of them (a few for the interpreter's own work)
    assert r["faults"] < 1000, r


def test_default_malloc_when_asked(qwen2_dir):
    r = _run(qwen2_dir, PRMKERN_CPU_MALLOC="default")
    assert r["applied"] is False
    # glibc maps a 64 MiB block afresh and faults its pages in (transparent huge pages would make it fewer, 2 MiB
    # each: 32)
    assert r["faults"] >= 32, r

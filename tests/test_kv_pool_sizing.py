"""The CPU KV pool's size and residency: 40% of MemAvailable (at least 1 GiB, 1 GiB when unreadable), capped at what
max_num_seqs sequences at full context can use, explicit sizes winning; and a large pool is reserved without being
touched (resident memory grows with the blocks written, not with the pool)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from prmkern import LLM
from prmkern.engine import engine as engine_mod
from prmkern.engine.runner import kv_block_bytes
from prmkern.tiny import build_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:prmkern. no tokenizer files")
GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 2 layers x 2 KV heads x head_dim 16, max 1024 positions: a 16-token block is 8 KiB in float32.
    return build_checkpoint(str(tmp_path_factory.mktemp("kvpool") / "m"), "qwen2", vocab_size=128, hidden_size=64,
                            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=1024, tokenizer=False)


def test_budget_rule():
    assert engine_mod.cpu_kv_cache_budget(None) == GiB
    assert engine_mod.cpu_kv_cache_budget(0) == GiB
    assert engine_mod.cpu_kv_cache_budget(10 * GiB) == 4 * GiB
    assert engine_mod.cpu_kv_cache_budget(2 * GiB) == GiB  # 40% would be below the 1 GiB floor


@pytest.mark.parametrize("available, max_num_seqs", [(10 * GiB, 100_000), (None, 100_000), (10 * GiB, 4)])
def test_pool_size_from_available_memory(model_dir, monkeypatch, available, max_num_seqs):
    monkeypatch.setattr(engine_mod, "available_memory_bytes", lambda: available)
    llm = LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=max_num_seqs)
    block = kv_block_bytes(llm.engine.model, 16, llm.engine.config.dtype)
    assert block == 2 * 2 * 16 * 2 * 16 * 4
    budget = max(GiB, int(0.4 * available)) if available else GiB  # the documented rule, not the engine's code
    want = budget // block
    want = min(want, max_num_seqs * (1024 // 16))  # never more than every sequence at full context needs
    assert llm.engine.num_blocks == want
    k_cache = llm.engine.runner.kv_caches[0][0]
    assert k_cache.shape[0] == want


def test_explicit_sizes_win(model_dir, monkeypatch):
    monkeypatch.setattr(engine_mod, "available_memory_bytes", lambda: 100 * GiB)
    assert LLM(model_dir, dtype="float32", device="cpu", num_kvcache_blocks=37).engine.num_blocks == 37
    assert LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory=8192 * 10).engine.num_blocks == 10
    with pytest.raises(ValueError, match="holds no block"):
        LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory=100)


_RESIDENT = """
import sys
from prmkern import LLM, SamplingParams

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

before = rss()
llm = LLM(sys.argv[1], dtype="float32", device="cpu", kv_cache_memory=3 << 30, max_num_seqs=100000)
pool = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in llm.engine.runner.kv_caches)
after = rss()
llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, n=2))
print(pool, after - before, rss() - before)
"""


def test_large_pool_is_reserved_not_touched(model_dir):
    """A 3 GiB pool must not make the process 3 GiB larger: only the blocks written are committed."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    out = subprocess.run([sys.executable, "-c", _RESIDENT, model_dir], check=True, capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout.split()
    pool, grown_at_start, grown_after_use = map(int, out[-3:])
    assert pool >= 3 * GiB - 8192
    assert grown_at_start < pool // 8, (grown_at_start, pool)
    assert grown_after_use < pool // 8, (grown_after_use, pool)

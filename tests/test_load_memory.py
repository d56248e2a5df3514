"""Loading a checkpoint costs its weights' bytes, not twice that: the parameters are allocated in the target dtype
(no fp32 staging) and read straight from the safetensors files (prmkern/models/safetensors_reader.py). Checked on a
~110 MB bf16 checkpoint in a fresh interpreter (peak resident set - the resident set before loading <= 1.2x the
weights; benchmarks/bench_load_memory.py measures the whole process's peak at the 1.5B shape), and the values loaded against safetensors' own reader."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_load_memory import measure  # noqa: E402
from prmkern.models import load_model  # noqa: E402
from prmkern.tiny import write_random_checkpoint  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> str:
    return write_random_checkpoint(str(tmp_path_factory.mktemp("bf16")), "qwen2", dtype=torch.bfloat16, **MODEL)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_bf16_load_peaks_at_the_weights(bf16_dir, qwen2_dir):
    """What loading adds to the resident set, after a first small load (qwen2_dir) paid the one-time costs."""
    r = measure(bf16_dir, "bfloat16", warm=qwen2_dir)
    assert r["weights_bytes"] > 100e6
    assert r["load_over_weights"] <= 1.2, r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loaded_values_are_the_files(bf16_dir, dtype):
    """Every parameter equals the file's tensor (converted to dtype; q/k/v and gate/up stacked in order)."""
    sd = load_file(str(Path(bf16_dir) / "model.safetensors"))
    params = dict(load_model(bf16_dir, dtype, "cpu").named_parameters())
    stacked = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for name, p in params.items():
        parts = name.split(".")
        if parts[-2] in stacked:
            ref = torch.cat([sd[".".join(parts[:-2] + [s, parts[-1]])] for s in stacked[parts[-2]]])
        else:
            ref = sd[name]
        assert p.dtype == dtype and torch.equal(p, ref.to(dtype)), name

"""The C++ panel GEMM (csrc/panel_gemm.cpp, `decode_linear(..., panels=)`) and its weight copies
(prmkern/models/decode_panels.py): against float64 products for fp32 / bf16 / fp16 weights, row counts on and off
the 8-row (AVX-512) and 4-row (AVX2) passes, N off the 48-column panel and the 16-column thread unit, K odd; bf16
pair panels with AVX-512 BF16 dot products and their fallbacks; every instruction-set level (PRMKERN_ISA, in
subprocesses); a row's result independent of the row count and the thread
count (one FMA chain per output); bad panels rejected with what was given; copies re-packed when the weight changes;
the budget; and the engine's tokens with and without panels."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from prmkern.ops.cpp import cpp_ops
from prmkern.models.decode_panels import (PANEL_COLS, attach_panels, pack_pair_panels, pack_panels, panel_bytes,
                                          wants_panels)
from prmkern.models.packed_gemm import Linear

OPS = cpp_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="prmkern._C (csrc/) is not built")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(x, w, b):
    return x.double() @ w.double().T + (b.double() if b is not None else 0)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, K, N", [(1, 64, 4), (2, 37, 47), (3, 128, 48), (5, 515, 49), (7, 33, 100),
                                     (8, 512, 96), (9, 16, 530), (16, 512, 2816), (17, 9, 3), (64, 200, 33),
                                     (130, 77, 161)])
def test_panel_gemm_matches_float64(wdtype, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(wdtype)
    b = torch.randn(N, generator=g) if N % 2 else None
    y = OPS.decode_linear(x, w, b, pack_panels(w))
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # float32 sums of K exact products (bf16 / fp16 weights widen exactly): error grows like K * eps * |terms|
    tol = 4e-7 * K * (1 + K ** 0.5)
    torch.testing.assert_close(y.double(), _reference(x, w, b), atol=tol, rtol=1e-5)


def test_pack_layout():
    w = torch.arange(50 * 3, dtype=torch.float32).view(50, 3)
    p = pack_panels(w)
    assert p.shape == (2, 3, PANEL_COLS) and p.is_contiguous()
    assert torch.equal(p[0, :, 5], w[5]) and torch.equal(p[1, :, 1], w[49])
    assert torch.count_nonzero(p[1, :, 2:]) == 0  # past N: zeros
    assert panel_bytes(w) == p.numel() * 4
    with pytest.raises(ValueError, match="2-D"):
        pack_panels(torch.zeros(3))


def test_low_precision_activations_take_panels():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(6, 96, generator=g).to(dtype)
        w = torch.randn(40, 96, generator=g).to(dtype)
        y = OPS.decode_linear(x, w, None, pack_panels(w))
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), _reference(x, w, None), atol=2e-2, rtol=1e-2)


def test_rows_do_not_depend_on_batch_or_threads():
    """Each output is one FMA chain over k: a row's bits are the same alone, in 16 or 64 rows, on 1 or 2 threads."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1000, 300, generator=g)  # enough weights to take 2 threads
    p = pack_panels(w)
    x = torch.randn(64, 300, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = OPS.decode_linear(x, w, None, p)
        torch.set_num_threads(1)
        one_thread = OPS.decode_linear(x, w, None, p)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(full, one_thread)
    for rows in (1, 3, 16, 17):
        assert torch.equal(OPS.decode_linear(x[:rows].contiguous(), w, None, p), full[:rows])
    assert torch.equal(OPS.decode_linear(x[5:6].contiguous(), w, None, p), full[5:6])


def test_bad_panels_fail_with_what_was_given():
    w = torch.randn(50, 8)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"panels must be .*\[2, 8, 48\].*got Float \[1, 8, 48\]"):
        OPS.decode_linear(x, w, None, torch.zeros(1, 8, 48))
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.decode_linear(x, w, None, pack_panels(w).half())
    with pytest.raises(RuntimeError, match="not contiguous"):
        OPS.decode_linear(x, w, None, torch.zeros(2, 48, 8).transpose(1, 2))
    with pytest.raises(RuntimeError, match=r"for a bf16 weight, \[2, 4, 48, 2\]"):  # pair panels of a float32 weight
        OPS.decode_linear(x, w, None, torch.zeros(2, 4, 48, 2))
    with pytest.raises(RuntimeError, match=r"got BFloat16 \[2, 3, 48, 2\]"):
        OPS.decode_linear(x.bfloat16(), w.bfloat16(), None, torch.zeros(2, 3, 48, 2, dtype=torch.bfloat16))


_LEVEL_SWEEP = """
import torch
from prmkern import _C
from prmkern.models.decode_panels import pack_panels
print(_C.cpu_isa())
g = torch.Generator().manual_seed(0)
for wd in (torch.float32, torch.bfloat16, torch.float16):
    for M in (1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 19):
        for K, N in ((77, 13), (16, 48), (512, 9), (33, 100), (40, 2000)):
            x = torch.randn(M, K, generator=g); w = torch.randn(N, K, generator=g).to(wd); b = torch.randn(N, generator=g)
            y = _C.decode_linear(x, w, b, pack_panels(w))
            torch.testing.assert_close(y.double(), x.double() @ w.double().T + b.double(), atol=1e-4 * K ** 0.5,
                                       rtol=1e-5)
"""


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_every_isa_level_matches(level):
    env = dict(os.environ, PRMKERN_ISA=level, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _LEVEL_SWEEP], check=True, env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True).stdout.split()
    if out[0] != level:
        pytest.skip(f"this CPU runs {out[0]}, not {level}")


def test_copy_follows_the_weight():
    """An in-place update or a replaced Parameter re-packs the copy on the next call: never a stale product."""
    torch.manual_seed(0)
    lin = Linear(64, 100, bias=True)
    lin.cpp = OPS
    assert attach_panels([lin], 1 << 20, bf16_dot=False) == panel_bytes(lin.weight)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias, atol=1e-5, rtol=1e-5)
        lin.weight.mul_(-2.0)
        torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias, atol=1e-5, rtol=1e-5)
        lin.weight = torch.nn.Parameter(torch.randn(100, 64))
        torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # the engine's mode
        lin.weight.add_(1.0)
        torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias, atol=1e-5, rtol=1e-5)


def test_budget_and_dtypes():
    lins = [Linear(64, 96), Linear(64, 96), Linear(64, 96)]
    one = panel_bytes(lins[0].weight)
    assert attach_panels(lins, 2 * one, bf16_dot=False) == 2 * one
    assert [m.panel_copy is not None for m in lins] == [True, True, False]
    assert attach_panels(lins, 0, bf16_dot=False) == 0 and all(m.panel_copy is None for m in lins)
    for isa in ("avx2", "scalar"):  # the panel tiles pay only on the AVX-512 path
        assert attach_panels(lins, 1 << 30, bf16_dot=False, isa=isa) == 0
        assert all(m.panel_copy is None for m in lins)
    bf16 = torch.zeros(96, 64, dtype=torch.bfloat16)
    assert wants_panels(bf16) and wants_panels(bf16.half()) and not wants_panels(bf16.double())
    lin = Linear(63, 50).bfloat16()
    attach_panels([lin], 1 << 20, bf16_dot=True)
    assert lin.panel_copy.panels.shape == (2, 32, PANEL_COLS, 2) and lin.panel_copy.panels.numel() * 2 == \
        panel_bytes(lin.weight, pairs=True)
    attach_panels([lin], 1 << 20, bf16_dot=False)
    assert lin.panel_copy.panels.shape == (2, 63, PANEL_COLS)


def test_pair_panel_layout():
    w = torch.arange(50 * 5, dtype=torch.float32).view(50, 5).bfloat16()
    p = pack_pair_panels(w)
    assert p.shape == (2, 3, PANEL_COLS, 2) and p.is_contiguous()
    assert torch.equal(p[0, 1, 7], w[7, 2:4]) and torch.equal(p[1, 2, 1, 0], w[49, 4])
    assert p[1, 2, 1, 1] == 0 and torch.count_nonzero(p[1, :, 2:]) == 0  # past K and past N: zeros
    with pytest.raises(ValueError, match="bf16"):
        pack_pair_panels(torch.zeros(4, 4))


_PAIR_SWEEP = """
import torch
from prmkern import _C
from prmkern.models.decode_panels import pack_pair_panels
print(_C.bf16_dot())
g = torch.Generator().manual_seed(1)
for M in (1, 2, 5, 7, 8, 9, 16, 17, 64):
    for K, N in ((64, 4), (95, 49), (512, 13), (1408, 100), (1, 50), (37, 2000)):
        x = torch.randn(M, K, generator=g).bfloat16(); w = torch.randn(N, K, generator=g).bfloat16()
        b = torch.randn(N, generator=g)
        want = x.double() @ w.double().T + b.double()
        y = _C.decode_linear(x, w, b, pack_pair_panels(w))
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), want, atol=1e-4 * K ** 0.5, rtol=2 ** -8)
        # float32 activations with pair panels take the weight's own path
        xf = x.float()
        torch.testing.assert_close(_C.decode_linear(xf, w, b, pack_pair_panels(w)), _C.decode_linear(xf, w, b))
# one chain of pair products per output: a row's bits do not depend on the rows batched with it
w = torch.randn(1000, 301, generator=g).bfloat16(); p = pack_pair_panels(w); x = torch.randn(40, 301, generator=g).bfloat16()
full = _C.decode_linear(x, w, None, p)
for r in (1, 9, 16):
    assert torch.equal(_C.decode_linear(x[:r].contiguous(), w, None, p), full[:r])
"""


@pytest.mark.parametrize("bf16_dot", ["1", "0"])
def test_pair_panels_match_float64(bf16_dot):
    """bf16 x bf16 on pair panels: vdpbf16ps where the CPU has it; PRMKERN_BF16_DOT=0 (or a CPU without it) takes
    the weight's widening path. Both against float64 products of the same bf16 values, output rounded to bf16."""
    env = dict(os.environ, PRMKERN_BF16_DOT=bf16_dot, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _PAIR_SWEEP], check=True, env=env, cwd=ROOT, timeout=300,
                         capture_output=True, text=True).stdout.split()
    if bf16_dot == "1" and out[0] != "True":
        pytest.skip("this CPU has no AVX-512 BF16")


@pytest.mark.filterwarnings("ignore:prmkern. no tokenizer files")
def test_engine_tokens_with_and_without_panels(tmp_path):
    """The engine through panel copies (default budget) and through the output-major GEMM (budget 0): the same
    tokens and logprobs to float32 rounding, and the copies are really made and used."""
    from prmkern import LLM, SamplingParams
    from prmkern.tiny import build_checkpoint

    path = build_checkpoint(str(tmp_path / "m"), "qwen2", vocab_size=256, hidden_size=128, intermediate_size=192,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tokenizer=False,
                            seed=5)
    params = SamplingParams(n=4, temperature=1e-4, max_tokens=10, seed=1, logprobs=1)
    runs = []
    made = OPS.cpu_isa() == "avx512"  # where the runner makes copies
    for budget in (1 << 30, 0):
        llm = LLM(path, dtype="float32", device="cpu", attention_backend="cpp", packed_gemm_bytes=budget)
        linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
        assert all((m.panel_copy is not None) == (budget > 0 and made) for m in linears)
        assert llm.engine.runner.panel_bytes == sum(panel_bytes(m.weight) for m in linears) * (budget > 0 and made)
        out = llm.generate([list(range(3, 30))], params)[0]
        runs.append([(c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]) for c in out.outputs])
    for (ta, la), (tb, lb) in zip(*runs):
        assert ta == tb
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=0)

"""The C++ draw of the CPU sampler (`_C.sample_rows`, csrc/sampling.cpp) against a float64 inverse-CDF reference:
every drawn token is the one whose float64 cumulative-probability bracket holds u (up to float32 softmax rounding
at the bracket edges), exact frequencies on a grid of u, masked (-inf) tokens never drawn, bad rows failing alone,
the scalar path (PRMKERN_ISA=scalar) as well, and the Sampler drawing the same tokens with and without it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from prmkern.ops.cpp import cpp_ops

OPS = cpp_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="prmkern._C (csrc/) is not built")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_brackets(logits: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """float64 cumulative probabilities [R, V + 1] with a leading 0: token k owns [C[k], C[k + 1])."""
    x = logits.double() if temperature is None else logits.double() / temperature.double()[:, None]
    c = torch.softmax(x, dim=-1).cumsum(-1)
    return torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.float64), c / c[:, -1:]], dim=1)


def assert_in_brackets(tokens: torch.Tensor, u: torch.Tensor, c: torch.Tensor, slack: float = 2e-6) -> None:
    """Each token's bracket holds its u, within `slack` (float32 weights vs float64); and most draws match the
    float64 search exactly (the slack only matters at bracket edges)."""
    rows = torch.arange(c.shape[0])
    lo, hi = c[rows, tokens], c[rows, tokens + 1]
    assert bool((hi > lo).all()), "a zero-probability token was drawn"
    assert bool(((lo - slack <= u) & (u < hi + slack)).all()), (tokens, u, lo, hi)
    exact = torch.searchsorted(c[:, 1:].contiguous(), u[:, None], right=True)[:, 0]
    assert (exact == tokens).double().mean() >= 0.99


@pytest.mark.parametrize("V", [1, 7, 8, 63, 64, 65, 1000, 32003, 151936])
def test_tokens_match_float64_inverse_cdf(V):
    g = torch.Generator().manual_seed(V)
    R = 24
    logits = torch.randn(R, V, generator=g) * 4
    if V > 8:  # masked tokens (allowed_token_ids / bans): -inf, weight 0
        logits[torch.rand(R, V, generator=g) < 0.3] = float("-inf")
        logits[:, 0] = 0.0  # keep every row drawable
    u = torch.rand(R, generator=g, dtype=torch.float64)
    tokens, ok = OPS.sample_rows(logits, u)
    assert tokens.dtype == torch.int64 and ok.all()
    assert bool(torch.isfinite(logits[torch.arange(R), tokens]).all()), "a -inf token was drawn"
    assert_in_brackets(tokens, u, reference_brackets(logits))


def test_temperatures_divide_each_row():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 5000, generator=g) * 3
    temps = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 0.05])
    u = torch.rand(6, generator=g, dtype=torch.float64)
    tokens, ok = OPS.sample_rows(logits, u, temps)
    assert ok.all()
    assert_in_brackets(tokens, u, reference_brackets(logits, temps))


def test_frequencies_on_a_grid_of_u_are_the_probabilities():
    """u on a uniform grid of n points: token k is drawn n * p_k times, to within one per bracket edge."""
    p = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.0625, 0.0625])
    n = 4096
    logits = torch.log(p).float().expand(n, -1).contiguous()  # log 0 = -inf
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens, ok = OPS.sample_rows(logits, u)
    assert ok.all()
    counts = torch.bincount(tokens, minlength=6).double()
    assert (counts - n * p.double()).abs().max() <= 1, counts
    # The ends: u = 0 draws the first drawable token; u just below 1 the last one.
    edge, _ = OPS.sample_rows(logits[:2], torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64))
    assert edge.tolist() == [0, 5]


def test_bad_rows_fail_alone():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 300, generator=g)
    logits[1, 17] = float("nan")
    logits[2, 3] = float("inf")
    logits[3] = float("-inf")
    logits[4] = float("-inf")
    logits[4, 123] = -5.0  # a single drawable token: always drawn
    u = torch.rand(6, generator=g, dtype=torch.float64)
    tokens, ok = OPS.sample_rows(logits, u)
    assert ok.tolist() == [True, False, False, False, True, True]
    assert tokens[4].item() == 123 and tokens[1].item() == 0
    good = torch.tensor([0, 5])
    assert_in_brackets(tokens[good], u[good], reference_brackets(logits[good]))


def test_bad_arguments_say_what_is_accepted():
    x = torch.randn(2, 10)
    u = torch.rand(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32"):
        OPS.sample_rows(x.double(), u)
    with pytest.raises(RuntimeError, match=r"float64 tensor \[2\]"):
        OPS.sample_rows(x, u.float())
    with pytest.raises(RuntimeError, match="temperature"):
        OPS.sample_rows(x, u, torch.tensor([1.0, 0.0]))
    with pytest.raises(RuntimeError, match="accepted: 0 <= u <= 1"):
        OPS.sample_rows(x, torch.tensor([0.5, float("nan")], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        OPS.sample_rows(torch.randn(10, 2).T, u)


_SCALAR = """
import torch
from prmkern import _C
g = torch.Generator().manual_seed(3)
x = torch.randn(8, 1003, generator=g) * 3
x[:, ::5] = float("-inf")
u = torch.rand(8, generator=g, dtype=torch.float64)
t, ok = _C.sample_rows(x, u)
print(_C.cpu_isa(), " ".join(map(str, t.tolist())))
"""


def test_scalar_path_draws_the_same_tokens():
    """PRMKERN_ISA=scalar (a CPU without AVX2) against this CPU's path on rows whose u is far from any edge."""
    env = dict(os.environ, PRMKERN_ISA="scalar", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _SCALAR], check=True, env=env, cwd=ROOT, timeout=120,
                         capture_output=True, text=True).stdout.split()
    assert out[0] == "scalar"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1003, generator=g) * 3
    x[:, ::5] = float("-inf")
    u = torch.rand(8, generator=g, dtype=torch.float64)
    assert_in_brackets(torch.tensor([int(t) for t in out[1:]]), u, reference_brackets(x))
    assert [int(t) for t in out[1:]] == OPS.sample_rows(x, u)[0].tolist()


def test_sampler_draws_the_same_tokens_with_and_without_the_kernel():
    """The engine's Sampler: the C++ draw and the torch draw, the same per-row generators, the same tokens (the
    seeds here put no u within float32 rounding of a bracket edge); filtered rows (top-k) keep the torch path."""
    from prmkern.engine.sampler import Sampler
    from prmkern.sampling_params import SamplingParams
    from prmkern.engine.sequence import Request, Sequence

    def seqs(params):
        return [Sequence(i, Request(str(i), None, [1, 2, 3], p), 0, torch.Generator().manual_seed(100 + i))
                for i, p in enumerate(params)]

    params = [SamplingParams(temperature=t, max_tokens=4) for t in (1.0, 0.6, 1.0, 1.3, 0.0)]
    params.append(SamplingParams(temperature=1.0, top_k=5, max_tokens=4))
    logits = torch.randn(len(params), 4000, generator=torch.Generator().manual_seed(4)) * 2
    with_kernel = Sampler((0,), OPS)(logits.clone(), seqs(params))
    torch_only = Sampler((0,), None)(logits.clone(), seqs(params))
    assert with_kernel.token_ids == torch_only.token_ids
    assert not with_kernel.failed and not torch_only.failed

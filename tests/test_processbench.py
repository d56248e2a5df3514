"""ProcessBench loading and the official F1: a direct computation of the formula, perfect predictions, and the
constant predictors on the shared subsets (../shared/data/processbench), checked both against plain counting of
the label distribution and against literals computed once (so a change in data or code is caught)."""
import json
import random
from pathlib import Path

import pytest

from prmkern.verify import evaluate_subsets, load_processbench, processbench_f1, sample_path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "processbench"
if not SHARED.exists():
    SHARED = Path("/work/shared/data/processbench")

# Computed once from the shared files: (records, erroneous, error-free, erroneous with label 0).
DISTRIBUTION = {"gsm8k": (400, 207, 193, 37), "math": (1000, 594, 406, 114)}


def _subset(name):
    path = SHARED / f"{name}.json"
    if not path.exists():
        pytest.skip(f"ProcessBench subset not found at {path}")
    return load_processbench(path)


def _official(labels, preds):
    """The formula written out with plain loops."""
    err_hit = err_n = ok_hit = ok_n = 0
    for lab, p in zip(labels, preds):
        if lab == -1:
            ok_n += 1
            ok_hit += p == -1
        else:
            err_n += 1
            err_hit += p == lab
    a, b = err_hit / err_n, ok_hit / ok_n
    return a, b, (2 * a * b / (a + b) if a + b else 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_matches_the_formula_on_random_predictions(seed):
    rng = random.Random(seed)
    labels = [rng.choice([-1, -1, 0, 1, 2, 3, 4]) for _ in range(300)]
    preds = [lab if rng.random() < 0.5 else rng.choice([-1, 0, 1, 2, 3, 4, None]) for lab in labels]
    r = processbench_f1(labels, preds)
    a, b, f = _official(labels, preds)
    assert (r.acc_err, r.acc_ok, r.f1) == pytest.approx((a, b, f))
    assert r.n_err + r.n_ok == 300


def test_perfect_predictions_score_one_on_both_subsets():
    data = {name: _subset(name) for name in DISTRIBUTION}
    res = evaluate_subsets({n: ([r["label"] for r in rs], [r["label"] for r in rs]) for n, rs in data.items()})
    assert res["gsm8k"].f1 == 1.0 and res["math"].f1 == 1.0 and res["mean_f1"] == 1.0


@pytest.mark.parametrize("name", list(DISTRIBUTION))
def test_constant_predictors_on_the_shared_subsets(name):
    recs = _subset(name)
    labels = [r["label"] for r in recs]
    n, n_err, n_ok, n_zero = DISTRIBUTION[name]
    # the label distribution, by plain counting, is what the literals say
    assert (len(labels), sum(l != -1 for l in labels), labels.count(-1), labels.count(0)) == (n, n_err, n_ok, n_zero)

    always_ok = processbench_f1(labels, [-1] * n)
    assert (always_ok.acc_err, always_ok.acc_ok, always_ok.f1) == (0.0, 1.0, 0.0)

    always_first = processbench_f1(labels, [0] * n)
    assert always_first.acc_err == pytest.approx(n_zero / n_err)
    assert (always_first.acc_ok, always_first.f1) == (0.0, 0.0)
    assert always_first.acc_err == pytest.approx({"gsm8k": 0.178744, "math": 0.191919}[name], abs=1e-6)

    # Half right on each side: a predictor that is right on the first half of each kind of record.
    seen = {"err": 0, "ok": 0}
    preds = []
    for lab in labels:
        kind = "ok" if lab == -1 else "err"
        preds.append(lab if seen[kind] < {"err": n_err, "ok": n_ok}[kind] // 2 else (0 if lab == -1 else -1))
        seen[kind] += 1
    r = processbench_f1(labels, preds)
    a, b, f = _official(labels, preds)
    assert r.f1 == pytest.approx(f)
    assert r.f1 == pytest.approx({"gsm8k": 0.497497, "math": 0.5}[name], abs=1e-6)


def test_mean_over_subsets():
    res = evaluate_subsets({"a": ([-1, 0], [-1, 0]), "b": ([-1, 1], [-1, 0])})
    assert res["a"].f1 == 1.0 and res["b"].f1 == 0.0 and res["mean_f1"] == 0.5


def test_bundled_sample_is_balanced_and_loads(tmp_path):
    recs = load_processbench(sample_path())
    assert len(recs) == 16
    for prefix in ("gsm8k", "math"):
        sub = [r for r in recs if r["id"].startswith(prefix)]
        assert len(sub) == 8 and sum(r["label"] == -1 for r in sub) == 4
    # JSON array and JSONL load alike
    arr = tmp_path / "x.json"
    arr.write_text(json.dumps(recs[:3]))
    assert load_processbench(arr) == recs[:3]


def test_bad_records_and_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "p", "steps": ["a"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match="label"):
        load_processbench(bad)
    bad.write_text(json.dumps({"problem": "p", "label": -1}) + "\n")
    with pytest.raises(ValueError, match="steps"):
        load_processbench(bad)
    with pytest.raises(ValueError):
        processbench_f1([-1, 0], [-1])
    with pytest.raises(ValueError):
        evaluate_subsets({})

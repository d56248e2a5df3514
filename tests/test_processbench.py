"""ProcessBench loading and the official F1: a direct computation of the formula, perfect predictions, and the
constant predictors on the shared subsets (../shared/data/processbench), checked both against plain counting of
the label distribution and against literals computed once (so a change in data or code is caught)."""
import json
import math
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


# -- the official code's edge cases, plurality vote and balanced slices --------------------------------------------

def _numpy_official(labels, preds):
    """QwenLM/ProcessBench code/run_eval.py's metric, re-implemented here with numpy as it does (percentages)."""
    import warnings

    import numpy as np
    match = [p == lab for lab, p in zip(labels, preds)]
    err = [m for m, lab in zip(match, labels) if lab != -1]
    ok = [m for m, lab in zip(match, labels) if lab == -1]
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        acc1 = np.mean(err) * 100
        acc2 = np.mean(ok) * 100
        f1 = 2 * acc1 * acc2 / (acc1 + acc2)
    return float(acc1), float(acc2), float(f1)


def _same(x, y):
    return (math.isnan(x) and math.isnan(y)) or x == y


@pytest.mark.parametrize("name,seed", [("gsm8k", 0), ("gsm8k", 1), ("math", 0), ("math", 1)])
def test_official_f1_reproduced_exactly_on_the_shared_subsets(name, seed):
    recs = _subset(name)
    labels = [r["label"] for r in recs]
    rng = random.Random(seed)
    preds = [lab if rng.random() < 0.6 else rng.choice([-1, 0, 1, 2, 99, None]) for lab in labels]
    r = processbench_f1(labels, preds)
    acc1, acc2, f1 = _numpy_official(labels, preds)
    assert r.f1_percent == f1  # exactly the official number
    assert r.acc_err * 100 == pytest.approx(acc1, abs=1e-12) and r.f1 * 100 == pytest.approx(f1, abs=1e-9)


def test_nan_where_the_official_code_gives_nan():
    for labels, preds in [([-1, -1], [-1, 0]),  # no erroneous record: acc_err is NaN
                          ([0, 1], [0, 1]),  # no error-free record
                          ([0, -1], [1, 0]),  # both accuracies 0: 0/0
                          ([0, -1], [None, None])]:
        r = processbench_f1(labels, preds)
        assert math.isnan(r.f1) and math.isnan(r.f1_percent)
        assert all(_same(a, b) for a, b in zip((r.acc_err * 100, r.acc_ok * 100, r.f1_percent),
                                                _numpy_official(labels, preds)))
    res = evaluate_subsets({"a": ([-1, 0], [-1, 0]), "b": ([0, -1], [1, 0])})
    assert res["a"].f1 == 1.0 and math.isnan(res["mean_f1"])


def test_out_of_range_none_and_non_integer_predictions():
    r = processbench_f1([0, 1, -1, -1], [7, None, -1, -5])  # out of range and None simply do not match
    assert (r.acc_err, r.acc_ok) == (0.0, 0.5) and r.f1 == 0.0
    for bad in ("2", 2.0, True, [1]):
        with pytest.raises(TypeError, match="prediction 1"):
            processbench_f1([0, 2], [0, bad])
    import numpy as np
    assert processbench_f1([0, 2], [np.int64(0), np.int32(2)]).f1 == pytest.approx(float("nan"), nan_ok=True)


def test_plurality_vote_is_the_official_one():
    from collections import Counter

    from prmkern.verify import plurality_vote

    def official(answers):  # run_eval.py with --use_voting
        preds = [e for e in answers if e is not None]
        if not preds:
            return None
        pred = Counter(preds).most_common(1)[0][0]
        try:
            return int(pred)
        except ValueError:
            return None

    cases = [["0", "0", "0", "2", "2", "2", "-1", "-1"], ["2", "-1", "-1", "2"], [None, None], [None, "3"],
             ["x", "x", "1"], ["01", "1", "1"], ["-1"], [" 2", "2", "2 "]]
    rng = random.Random(0)
    cases += [[rng.choice(["-1", "0", "1", "2", None, "a"]) for _ in range(rng.randint(1, 9))] for _ in range(200)]
    for answers in cases:
        assert plurality_vote(answers) == official(answers), answers
    assert plurality_vote(["0", "0", "0", "2", "2", "2", "-1", "-1"]) == 0  # averaging 0/1 steps would give 2
    with pytest.raises(TypeError):
        plurality_vote([2, 2])


def test_balanced_limit():
    from prmkern.verify import balanced_limit
    recs = _subset("math")
    assert all(r["label"] != -1 for r in recs[:10])  # a head slice would be all erroneous
    for n in (1, 2, 7, 10, 64):
        sub = balanced_limit(recs, n)
        n_ok = sum(r["label"] == -1 for r in sub)
        assert len(sub) == n and abs(2 * n_ok - n) <= 1
        idx = [recs.index(r) for r in sub]
        assert idx == sorted(idx)  # file order kept
    few = [{"label": 0}] * 5 + [{"label": -1}]
    assert sum(r["label"] == -1 for r in balanced_limit(few, 4)) == 1 and len(balanced_limit(few, 4)) == 4
    assert len(balanced_limit(few, 100)) == 6
    with pytest.raises(ValueError):
        balanced_limit(recs, 0)
    # An oracle on a balanced slice scores 1; on the head slice the official F1 is NaN (no error-free record).
    sub = balanced_limit(recs, 20)
    assert processbench_f1([r["label"] for r in sub], [r["label"] for r in sub]).f1 == 1.0
    assert math.isnan(processbench_f1([r["label"] for r in recs[:20]], [r["label"] for r in recs[:20]]).f1)


def test_verify_limit_takes_a_labelled_slice_with_errors(tmp_path):
    """`prmkern verify processbench --limit 4` once took the sample's first 4 records, all error-free (F1 nan)."""
    from prmkern.cli.jobs import read_items
    from prmkern.cli.verify import limit_items
    items = read_items(str(sample_path()))
    assert [it.record["label"] for it in items[:4]] == [-1] * 4  # the head slice this replaces
    got = limit_items(items, 4)
    assert [it.record["id"] for it in got] == ["gsm8k-386", "gsm8k-337", "gsm8k-147", "gsm8k-199"]  # file order
    labels = [it.record["label"] for it in got]
    f1 = processbench_f1(labels, [0, -1, 1, 2])  # two of each kind: both accuracies (and so F1) are defined
    assert math.isfinite(f1.f1) and sum(x == -1 for x in labels) == 2
    assert [it.index for it in got] == [0, 1, 4, 5]  # each keeps its input position (rows, resume)
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text("".join(json.dumps({"problem": "p", "steps": [f"s{i}"]}) + "\n" for i in range(5)))
    assert [it.index for it in limit_items(read_items(str(unlabelled)), 3)] == [0, 1, 2]
    assert limit_items(items, None) == items

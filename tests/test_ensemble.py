"""Ensembles (`prmkern verify --ensemble`): the combination rules restated by hand, agreement, and the command against
each member run alone on a fresh engine (the shipped verifier twice, with its own seed the second time, and a small
random discriminative PRM built here); members on one checkpoint share its engine and prefix cache."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from prmkern import LLM
from prmkern.sampling_params import derive_seed
from prmkern.tiny import build_prm_checkpoint
from prmkern.verify.ensemble import MemberRow, agreement, combine, parse_ensemble
from prmkern.verify.processbench import processbench_f1
from prmkern.verify.protocols import Verifier, VerifyConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIER = os.path.join(ROOT, "prmkern", "data", "verifier")


def test_parse_ensemble():
    members = parse_ensemble("thinkprm:/a/ThinkPRM, genprm:/b/GenPRM/,thinkprm:/a/ThinkPRM,qwen-prm:C:/x")
    assert [(m.format, m.model, m.name) for m in members] == [
        ("thinkprm", "/a/ThinkPRM", "thinkprm:ThinkPRM"), ("genprm", "/b/GenPRM/", "genprm:GenPRM"),
        ("thinkprm", "/a/ThinkPRM", "thinkprm:ThinkPRM#2"), ("qwen-prm", "C:/x", "qwen-prm:x")]
    for bad in ("", "thinkprm:/a", "thinkprm", ":/a,genprm:/b", "thinkprm:/a,genprm:"):
        with pytest.raises(ValueError, match="ensemble"):
            parse_ensemble(bad)


def test_combine_rules():
    a = MemberRow([0.9, 0.2, None], 0.5, 1)
    b = MemberRow([0.7, 0.6, 0.4], 0.65, 1)
    c = MemberRow(None, 0.5, None, error="engine error")  # a failed member does not count
    mean = combine([a, b, c], "mean", threshold=0.5)
    assert mean["step_scores"] == pytest.approx([0.8, 0.4, 0.4]) and mean["prediction"] == 1
    assert mean["members_scored"] == [2, 2, 1] and mean["solution_score"] == pytest.approx(0.4)
    low = combine([a, b, c], "min", threshold=0.3)
    assert low["step_scores"] == [0.7, 0.2, 0.4] and low["prediction"] == 1
    # vote: a's step 1 (0.2 < 0.5) and b's step 1 (0.6 < 0.65) are errors; step 0 correct for both (0.7 >= 0.65)
    vote = combine([a, b, c], "vote", threshold=0.9)
    assert vote["step_scores"] == [1.0, 0.0, 0.0] and vote["prediction"] == 1 and vote["threshold"] == 0.5
    # a tie is not an error; a step no member scored leaves the prediction unknown unless an error came first
    tie = combine([MemberRow([0.9, 0.1], 0.5, 1), MemberRow([0.9, 0.9], 0.5, -1)], "vote")
    assert tie["step_scores"] == [1.0, 0.5] and tie["prediction"] == -1
    unknown = combine([MemberRow([0.9, None], 0.5, None), MemberRow([0.9], 0.5, None)], "mean")
    assert unknown["step_scores"] == [0.9, None] and unknown["prediction"] is None
    failed = combine([c, c], "mean")
    assert failed["error"].startswith("every member failed") and failed["prediction"] is None
    with pytest.raises(ValueError, match="accepted: mean, min, vote"):
        combine([a], "median")


def test_agreement():
    got = agreement({"x": [1, -1, 2, None], "y": [1, 0, 2, 3], "z": [1, -1, 2, 3]})
    assert got["records"] == 3 and got["all_agree"] == pytest.approx(2 / 3)
    assert got["pairwise"]["x | y"] == {"agree": pytest.approx(2 / 3), "records": 3}
    assert got["pairwise"]["y | z"] == {"agree": pytest.approx(3 / 4), "records": 4}


def nan(x):
    return float("nan") if x is None else x  # the summary writes NaN as null


@pytest.mark.skipif(not os.path.isfile(os.path.join(VERIFIER, "model.safetensors")), reason="no shipped verifier")
def test_cli_ensemble_against_members_alone(tmp_path):
    prm = build_prm_checkpoint(str(tmp_path / "prm"), seed=3)
    with open(os.path.join(VERIFIER, "examples.jsonl")) as f:
        records = [json.loads(line) for line in f]
    records = [r for r in records if r["label"] != -1][:2] + [r for r in records if r["label"] == -1][:2]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = f"prmkern:{VERIFIER},prmkern:{VERIFIER},qwen-prm:{prm}"
    opts = ["--chains", "2", "--max-tokens", "256", "--verify-seed", "7", "--batch-size", "4"]
    r = subprocess.run([sys.executable, "-m", "prmkern", "verify", str(src), "--ensemble", spec, "--combine", "mean",
                        *opts, "--device", "cpu", "--dtype", "float32", "--threads", "2", "-o", str(tmp_path / "o"),
                        "--summary", str(tmp_path / "s.json"), "--no-progress", "--no-chains"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "o").read_text().splitlines()]
    summary = json.loads((tmp_path / "s.json").read_text())
    names = ["prmkern:verifier", "prmkern:verifier#2", "qwen-prm:prm"]

    # Each member alone on a fresh engine, as `prmkern verify` runs batch 0 (group seed); the repeated member with
    # its own seed.
    base = dict(num_chains=2, max_tokens=256, seed=7)
    alone = {}
    for name, model, config in [
            (names[0], VERIFIER, VerifyConfig(format="prmkern", **base)),
            (names[1], VERIFIER, VerifyConfig(format="prmkern", **{**base, "seed": derive_seed(7, 2)})),
            (names[2], prm, VerifyConfig(format="qwen-prm", seed=7))]:
        llm = LLM(model, device="cpu", dtype="float32")
        config = dataclasses.replace(config, seed=derive_seed(config.seed, 0))
        alone[name] = (Verifier(llm, config).verify(records), llm)
    for i, row in enumerate(rows):
        assert list(row["members"]) == names
        for name in names:
            want = alone[name][0][i]
            got = row["members"][name]
            assert got["step_scores"] == pytest.approx([s.score for s in want.scores.steps], abs=1e-6)
            assert got["prediction"] == want.prediction
        # mean over the members that scored each step, restated
        per_step = list(zip(*[row["members"][n]["step_scores"] for n in names]))
        want_mean = [None if not [s for s in st if s is not None] else
                     sum(s for s in st if s is not None) / len([s for s in st if s is not None]) for st in per_step]
        assert row["step_scores"] == pytest.approx(want_mean)
    # F1 per member and for the ensemble, and agreement, from the rows and labels
    labels = [rec["label"] for rec in records]
    m = summary["ensemble_labels"]
    for name in names:
        preds = [row["members"][name]["prediction"] for row in rows]
        assert nan(m["members"][name]["all"]["f1"]) == pytest.approx(processbench_f1(labels, preds).f1, nan_ok=True)
    ens = processbench_f1(labels, [row["prediction"] for row in rows])
    assert nan(m["ensemble"]["all"]["f1"]) == pytest.approx(ens.f1, nan_ok=True) and ens.f1 == ens.f1
    preds = {n: [row["members"][n]["prediction"] for row in rows] for n in names}
    assert m["agreement"] == json.loads(json.dumps(agreement(preds)))
    # Two engines for three members; the repeated member's prompts (the first's, token for token) came from the
    # prefix cache: at least every full block before each prompt's last token, on top of what one member alone found.
    engines = summary["engines"]
    assert sorted(len(e["members"]) for e in engines.values()) == [1, 2]
    shared = engines[os.path.realpath(VERIFIER)]
    llm = alone[names[0]][1]
    v = Verifier(llm, VerifyConfig(format="prmkern", **base))
    bs = llm.engine.block_manager.block_size
    full_blocks = sum((len(v.encode(v.fmt.render(rec["problem"], rec["steps"], v.tok))) - 1) // bs * bs
                      for rec in records)
    assert shared["cached_tokens"] - llm.stats.cached_tokens >= full_blocks > 0

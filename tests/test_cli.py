"""The CLI as a user runs it (subprocesses, JSONL in and out): generate, verify, eval processbench, bon, demo;
bad lines failing alone with their line numbers, configuration errors before the model loads, Ctrl-C and --resume,
summary files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prmkern.cli.verify import predict_earliest_error
from prmkern.cli.jobs import JobRunner, read_items

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
SAMPLE = os.path.join(REPO, "prmkern/data/processbench_sample.jsonl")
FAST = ("--device", "cpu", "--chains", "2", "--max-tokens", "24", "--temperature", "0", "--no-progress")


def run_cli(*args: str, stdin: str | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prmkern.cli", *args], input=stdin, capture_output=True,
                          text=True, env={**ENV, **(env_extra or {})}, timeout=300)


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines()]


def write_lines(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


SOLUTION = {"problem": "Compute 2 + 3 then double it.", "steps": ["2 plus 3 is 5.", "5 times 2 is 10."]}


def test_predict_earliest_error_unscored_rule():
    assert predict_earliest_error([0.9, 0.8], 0.5) == -1
    assert predict_earliest_error([0.9, 0.2, None], 0.5) == 1  # an error before the unjudged step stands
    assert predict_earliest_error([0.9, None, 0.2], 0.5) is None  # 1 of 3 unjudged before any error: unknown
    assert predict_earliest_error([None, 0.9, 0.9, 0.9], 0.5) is None  # not "no error"
    assert predict_earliest_error([0.5], 0.5) == -1 and predict_earliest_error([0.49], 0.5) == 0


def test_read_items_keeps_every_line_apart(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [SOLUTION, "{not json", "[1, 2]", '{"x": NaN}', "", "  ", '"str"',
                                               {**SOLUTION, "id": "z"}])
    items = read_items(path)
    assert [(it.index, it.line) for it in items] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 7), (5, 8)]
    assert [it.error is None for it in items] == [True, False, False, False, False, True]
    assert "malformed JSON" in items[1].error and "list" in items[2].error and "NaN" in items[3].error


def test_resume_drops_a_partial_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "line": 1}) + "\n" + '{"index": 1, "li')
    items = read_items(write_lines(tmp_path / "in.jsonl", [{"a": 1}, {"a": 2}, {"a": 3}]))
    runner = JobRunner(str(out), resume=True)

    def process(batch, emit):
        for it in batch:
            emit(it.index, it.row(error=None, a=it.record["a"]))
    runner.run(items, process, batch_size=2)
    rows = rows_of(out)
    assert [r["index"] for r in rows] == [0, 1, 2] and runner.skipped == 1
    assert [r["a"] for r in rows[1:]] == [2, 3]


def test_a_batch_that_raises_fails_alone(tmp_path):
    items = read_items(write_lines(tmp_path / "in.jsonl", [{"a": i} for i in range(5)]))
    out = tmp_path / "out.jsonl"
    runner = JobRunner(str(out))

    def process(batch, emit):
        emit(batch[0].index, batch[0].row(error=None))
        if any(it.record["a"] == 3 for it in batch):
            raise RuntimeError("engine broke")
        for it in batch[1:]:
            emit(it.index, it.row(error=None))
    runner.run(items, process, batch_size=2)
    rows = {r["index"]: r for r in rows_of(out)}
    assert sorted(rows) == [0, 1, 2, 3, 4] and rows[2]["error"] is None
    assert "RuntimeError" in rows[3]["error"] and "engine broke" in rows[3]["error"]
    assert [f["index"] for f in runner.failures()] == [3]


def test_generate_bad_lines_fail_alone_with_line_numbers(qwen2_dir, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        {"prompt": "the step is correct", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
        '{"prompt": "unterminated',                       # malformed JSON, line 2
        {"prompt_token_ids": [1, 2, 3], "n": 3, "max_tokens": 4, "ignore_eos": True, "seed": 1},
        "[1, 2, 3]",                                      # not an object, line 4
        '{"prompt": "x", "temperature": NaN}',            # non-finite constant, line 5
        {"prompt": "x", "max_tokens": 0},                 # invalid value, line 6
        {"text": "no prompt"},                            # missing field, line 7
        {"prompt_token_ids": [7] * 2000}])                # longer than the context, line 8
    out, summ = tmp_path / "out.jsonl", tmp_path / "summary.json"
    proc = run_cli("generate", "--model", qwen2_dir, "--device", "cpu", src, "-o", str(out), "--no-progress",
                   "--summary", str(summ))
    assert proc.returncode == 0, proc.stderr
    rows = {r["line"]: r for r in rows_of(out)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows[1]["error"] is None and len(rows[1]["outputs"][0]["token_ids"]) == 5
    assert len(rows[3]["outputs"]) == 3
    assert "malformed JSON" in rows[2]["error"] and "not a JSON object" in rows[4]["error"]
    assert "NaN" in rows[5]["error"] and "max_tokens" in rows[6]["error"] and "needs 'prompt'" in rows[7]["error"]
    assert "max_model_len" in rows[8]["error"]
    for line in (2, 4, 5, 6, 7, 8):
        assert f"in.jsonl:{line}:" in proc.stderr
    s = json.loads(summ.read_text())
    assert s["records"] == 8 and s["succeeded"] == 2 and s["failed"] == 6
    assert sorted(f["line"] for f in s["failures"]) == [2, 4, 5, 6, 7, 8]
    assert s["failures_by_reason"]["prompt exceeds the context"] == 1
    assert s["failures_by_reason"]["malformed JSON"] == 1 and s["failures_by_reason"]["not a JSON object"] == 1
    assert s["engine"]["generated_tokens"] == 5 + 3 * 4 and s["chains"] == 4


def test_verify_unlabelled_and_bad_records(tmp_path):
    src = write_lines(tmp_path / "mine.jsonl", [
        SOLUTION, {**SOLUTION, "id": "b"}, {"problem": "p", "steps": []}, {"problem": "p"},
        {**SOLUTION, "label": 7}, '{"problem": "p", "steps": ["a"], "label": Infinity}'])
    out, summ = tmp_path / "out.jsonl", tmp_path / "summary.json"
    proc = run_cli("verify", src, *FAST, "-o", str(out), "--summary", str(summ), "--no-chains", "--scoring", "exact")
    assert proc.returncode == 0, proc.stderr
    rows = {r["line"]: r for r in rows_of(out)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert all(r["scoring"] == "exact" for r in rows.values())  # failed records' rows too
    assert json.loads(summ.read_text())["scoring"] == "exact"
    for line in (1, 2):  # unlabelled records are verified
        assert rows[line]["error"] is None and len(rows[line]["step_scores"]) == 2
        assert rows[line]["prediction"] == predict_earliest_error(rows[line]["step_scores"], 0.5)
    assert rows[2]["id"] == "b" and rows[1]["id"] == 0
    assert "non-empty" in rows[3]["error"] and "'steps'" in rows[4]["error"] and "label" in rows[5]["error"]
    assert "Infinity" in rows[6]["error"]
    assert "gold labels" not in proc.stderr  # no labels, no agreement
    s = json.loads(summ.read_text())
    assert s["succeeded"] == 2 and s["failed"] == 4 and s["labels"] is None and s["chains"] == 4


def test_verify_subsets_come_from_a_field_not_an_id_prefix(tmp_path):
    recs = [json.loads(line) for line in open(SAMPLE).read().splitlines()[:3]]
    recs[0]["id"], recs[1]["id"], recs[2]["id"] = "a", "b", "a-2"  # prefixes would make subsets a and b
    recs[2]["subset"] = "mine"
    summ = tmp_path / "s.json"
    proc = run_cli("verify", write_lines(tmp_path / "l.jsonl", recs), *FAST, "--max-tokens", "8", "-o",
                   str(tmp_path / "o.jsonl"), "--summary", str(summ))
    assert proc.returncode == 0, proc.stderr
    f1 = json.loads(summ.read_text())["labels"]["f1"]
    assert set(f1) == {"all", "mine", "mean_f1"}
    assert f1["all"]["n_err"] + f1["all"]["n_ok"] == 2


def _main(*args: str) -> tuple[int, str, str]:
    """The CLI in this process (fast): exit code, stdout, stderr."""
    import contextlib
    import io

    from prmkern.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_configuration_errors_name_the_flag_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model loaded before the configuration was checked")
    monkeypatch.setattr("prmkern.cli.options.make_llm", no_model)  # the one factory every command calls
    src = write_lines(tmp_path / "in.jsonl", [SOLUTION])
    code, _, err = _main("verify", src, "--budget-tokens", "2048", "--max-tokens", "1024", "--device", "cpu")
    assert code == 2 and "--max-tokens 1024" in err and "--budget-tokens 2048" in err, err
    code, _, err = _main("verify", src, "--budget-tokens", "4096", "--device", "cpu")  # against the format default
    assert code == 2 and "--max-tokens" in err and "default" in err, err
    for bad, flag in ((["--threshold", "1.5"], "--threshold"), (["--chains", "0"], "--chains"),
                      (["--model", str(tmp_path)], "--model"), (["--resume"], "--resume"),
                      (["--kv-cache-memory", "lots"], "--kv-cache-memory"), (["--method", "max"], "--method"),
                      (["--threads", "0"], "--threads"), (["--format", "nope"], "nope")):
        code, _, err = _main("verify", src, "--device", "cpu", *bad)
        assert code == 2 and flag in err and "Traceback" not in err, (bad, err)
    code, _, err = _main("bon", src, "--n", "0", "--device", "cpu")
    assert code == 2 and "--n 0" in err


def test_version_and_defaults_in_help():
    from prmkern import __version__
    code, out, _ = _main("--version")
    assert code == 0 and out.strip() == f"prmkern {__version__}"
    for cmd in (["verify"], ["generate"], ["bon"], ["eval", "processbench"]):
        code, text, _ = _main(*cmd, "--help")
        text = " ".join(text.split())  # argparse wraps lines
        assert code == 0 and "(default: 16)" in text and "(default: 4096)" in text, cmd
        for flag in ("--threads", "--max-model-len", "--kv-cache-memory", "--enforce-eager", "--resume", "--summary",
                     "-o OUTPUT"):
            assert flag in text, (cmd, flag)


def _interrupt_then_resume(args: list[str], out, min_rows: int) -> subprocess.CompletedProcess:
    # SIGINT as a terminal delivers it: a test run started in the background (`cmd &` in a script) ignores SIGINT,
    # and a child would inherit that
    proc = subprocess.Popen([sys.executable, "-m", "prmkern.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= min_rows:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be interrupted: make it longer"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "interrupted" in err
    rows = rows_of(out)  # valid JSONL, every row whole
    assert min_rows <= len(rows) < 12
    return run_cli(*args, "--resume")


def test_generate_interrupted_then_resumed_equals_an_uninterrupted_run(qwen2_dir, tmp_path):
    recs = [{"prompt_token_ids": [i + 1, 2, 3], "max_tokens": 256, "ignore_eos": True, "seed": i,
             "temperature": 1.0, "n": 2} for i in range(12)]
    src = write_lines(tmp_path / "in.jsonl", recs)
    base = ["generate", "--model", qwen2_dir, "--device", "cpu", src, "--batch-size", "1", "--no-progress"]
    full = tmp_path / "full.jsonl"
    assert run_cli(*base, "-o", str(full)).returncode == 0
    out = tmp_path / "out.jsonl"
    proc = _interrupt_then_resume([*base, "-o", str(out), "--summary", str(tmp_path / "s.json")], out, 2)
    assert proc.returncode == 0, proc.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["resumed_skipped"] >= 2 and s["resumed_skipped"] + s["written"] == 12
    assert s["succeeded"] == 12 and s["failed"] == 0  # over the whole file, not only the resumed part
    got = sorted(rows_of(out), key=lambda r: r["index"])
    assert got == rows_of(full)


def test_verify_interrupted_then_resumed_equals_an_uninterrupted_run(tmp_path):
    recs = [json.loads(line) for line in open(os.path.join(REPO, "prmkern/data/verifier/examples.jsonl"))][:12]
    src = write_lines(tmp_path / "in.jsonl", recs)
    # sampled chains (T=1), two solutions per engine batch: a record's chains must not depend on what ran before
    base = ["verify", src, *FAST, "--max-tokens", "256", "--temperature", "1.0", "--batch-size", "2", "--no-chains"]
    full = tmp_path / "full.jsonl"
    assert run_cli(*base, "-o", str(full)).returncode == 0
    out = tmp_path / "out.jsonl"
    proc = _interrupt_then_resume([*base, "-o", str(out)], out, 2)
    assert proc.returncode == 0, proc.stderr
    got = sorted(rows_of(out), key=lambda r: r["index"])
    want = rows_of(full)
    assert [r["index"] for r in got] == list(range(12))
    for g, w in zip(got, want):
        assert g["verdict_counts"] == w["verdict_counts"] and g["prediction"] == w["prediction"]
        assert g["step_scores"] == pytest.approx(w["step_scores"], abs=1e-6)


def test_eval_processbench_reports_failures_with_their_reason(tmp_path):
    lines = open(SAMPLE).read().splitlines()
    sub = write_lines(tmp_path / "gsm8k.jsonl", lines[:3] + ['{"problem": "p", "steps": ["a"]}'])
    out, summ = tmp_path / "out.jsonl", tmp_path / "s.json"
    # a 160-token context: the shorter prompts fit, the longer ones fail as too long
    proc = run_cli("eval", "processbench", sub, *FAST, "--max-tokens", "4", "--max-model-len", "200", "-o",
                   str(out), "--summary", str(summ))
    assert proc.returncode == 0, proc.stderr
    rows = {r["line"]: r for r in rows_of(out)}
    assert sorted(rows) == [1, 2, 3, 4] and all(r["subset"] == "gsm8k" for r in rows.values())
    assert "label" in rows[4]["error"]
    s = json.loads(summ.read_text())
    too_long = s["failures_by_reason"].get("prompt exceeds the context", 0)
    assert too_long >= 1 and "prompt exceeds the context" in proc.stderr and "counts them as wrong" in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["official"]["gsm8k"]["n_err"] + report["official"]["gsm8k"]["n_ok"] == 3
    assert report["failed"] == 1 + too_long
    assert s["scoring"] == "exact"  # the format FAST picks (the shipped verifier's) has no released engine


def test_bon_writes_candidates_and_reads_math500_ids(tmp_path):
    probs = [{"problem": "What is 2 + 3?", "answer": "5", "subject": "x", "level": 1},
             {"problem": "What is 4 + 4?", "answer": "8", "unique_id": "test/x/1.json"}, [1]]
    out, summ = tmp_path / "out.jsonl", tmp_path / "s.json"
    proc = run_cli("bon", write_lines(tmp_path / "p.jsonl", probs), "--n", "3", "--gen-max-tokens", "16",
                   *FAST, "--max-tokens", "8", "-o", str(out), "--summary", str(summ))
    assert proc.returncode == 0, proc.stderr
    rows = {r["line"]: r for r in rows_of(out)}
    assert rows[1]["id"] == 0 and rows[2]["id"] == "test/x/1.json" and "not a JSON object" in rows[3]["error"]
    for r in (rows[1], rows[2]):
        assert len(r["candidates"]) == 3 and r["correct"] in (True, False)
        scores = [c["score"] for c in r["candidates"]]
        if any(x is not None for x in scores):
            assert r["score"] == max(x for x in scores if x is not None)
    s = json.loads(summ.read_text())
    assert s["records"] == 3 and s["failed"] == 1 and s["graded"] == 2
    assert s["scoring"] == rows[1]["scoring"] == "exact"


def test_demo_on_embedded_default(tmp_path):
    proc = run_cli("demo", "--device", "cpu", "--chains", "4", "--prompt-len", "64", "--gen-len", "8",
                   "--no-progress", env_extra={"PRMKERN_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["prefill_tokens"] == 64 and stats["generated_tokens"] == 32

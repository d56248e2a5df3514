"""What an audit of the command line found on 2026-12-07, each a case that misbehaved before its fix: `report -o` its
own run file and `-o X --summary X` destroyed data with exit 0; a missing or directory input, an output in a missing
directory and a --summary path that could not be written gave tracebacks (the last after the whole job); -o
/dev/null failed on truncating a device; a string "stop" in a formats file became one stop per character;
`prompt_token_ids` given as a string ran as text; a JSONL whose first line is a JSON array failed the whole file;
serve's --port / --log-level / --max-n and several verify flags gave tracebacks or garbled messages. Each is checked
before a model loads unless the case needs one (the tiny random Qwen2 then)."""
from __future__ import annotations

import fcntl
import json
import os

import pytest

from prmkern.cli.jobs import read_items
from prmkern.cli.options import UsageError
from prmkern.verify.formats import load_formats
from tests.test_cli import FAST, REPO, _main, run_cli, write_lines

EXAMPLES = os.path.join(REPO, "prmkern/data/verifier/examples.jsonl")

SOLUTION = {"problem": "Compute 2 + 3 then double it.", "steps": ["2 plus 3 is 5.", "5 times 2 is 10."]}
NO_MODEL = ("--model", "/nonexistent-model-dir")  # a case that gets past its check fails on this instead


def test_report_refuses_to_write_over_its_own_run(tmp_path):
    run = write_lines(tmp_path / "run.jsonl", [{"index": 0, "error": None}])
    before = open(run).read()
    proc = run_cli("report", run, "-o", run)
    assert proc.returncode != 0 and "is the input file" in proc.stderr, proc.stderr
    assert open(run).read() == before


@pytest.mark.parametrize("case,says", [
    ("same_output_and_summary", "is the same file as -o"),
    ("missing_input", "no such file"),
    ("directory_input", "is a directory"),
    ("output_in_missing_dir", "does not exist"),
    ("summary_in_missing_dir", "does not exist"),
    ("output_is_a_directory", "is a directory"),
])
def test_bad_paths_are_one_line_errors_before_the_model_loads(tmp_path, case, says):
    src = write_lines(tmp_path / "in.jsonl", [SOLUTION])
    (tmp_path / "adir").mkdir()
    args = {"same_output_and_summary": (src, "-o", str(tmp_path / "x.jsonl"), "--summary", str(tmp_path / "x.jsonl")),
            "missing_input": (str(tmp_path / "nope.jsonl"),),
            "directory_input": (str(tmp_path / "adir"),),
            "output_in_missing_dir": (src, "-o", str(tmp_path / "nodir" / "o.jsonl")),
            "summary_in_missing_dir": (src, "--summary", str(tmp_path / "nodir" / "s.json")),
            "output_is_a_directory": (src, "-o", str(tmp_path / "adir"))}[case]
    proc = run_cli("verify", *args, *NO_MODEL)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "nonexistent-model-dir" not in proc.stderr


def test_output_to_dev_null_works(tmp_path, qwen2_dir):
    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "one two", "max_tokens": 2}])
    proc = run_cli("generate", src, "--model", qwen2_dir, "--device", "cpu", "-o", "/dev/null", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("flags,says", [
    (("serve", "--port", "99999"), "--port 99999 is invalid"),
    (("serve", "--log-level", "bogus"), "invalid choice: 'bogus'"),
    (("serve", "--max-n", "0"), "--max-n 0 is invalid"),
    (("verify", "--budget-tokens", "0"), "--budget-tokens 0 is invalid; accepted: an int >= 1"),
    (("verify", "--temperature", "-1"), "--temperature -1.0 is invalid"),
    (("verify", "--chains-max", "4"), "--chains-max 4 needs --chains-min"),
])
def test_flag_errors_name_the_flag_without_a_traceback(flags, says):
    proc = run_cli(*flags)  # the shipped verifier by default: each check comes before it loads
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "SamplingParams." not in proc.stderr


def test_a_string_stop_in_a_formats_file_is_one_stop(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([{"base": "prmkern", "name": "x1", "stop": "Is the solution correct?"}]))
    assert load_formats(str(path), register=False)[0].stop == ("Is the solution correct?",)
    path.write_text(json.dumps([{"base": "prmkern", "name": "x2", "stop": 5}]))
    with pytest.raises(ValueError, match="'stop' is 5; accepted: a string or a list of strings"):
        load_formats(str(path), register=False)


def test_generate_refuses_token_ids_that_are_not_a_list(tmp_path, qwen2_dir):
    src = write_lines(tmp_path / "in.jsonl", [{"prompt_token_ids": "abc", "max_tokens": 2},
                                              {"prompt": "x", "prompt_token_ids": [5], "max_tokens": 2},
                                              {"prompt_token_ids": [5, 6], "max_tokens": 2, "temperature": 0}])
    out = tmp_path / "o.jsonl"
    proc = run_cli("generate", src, "--model", qwen2_dir, "--device", "cpu", "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "'prompt_token_ids' is \"abc\"" in rows[0]["error"] and "both" in rows[1]["error"]
    assert rows[2]["error"] is None and len(rows[2]["outputs"][0]["token_ids"]) == 2


def test_a_jsonl_whose_first_line_is_an_array_fails_that_line_alone(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("[1, 2]\n" + json.dumps(SOLUTION) + "\n")
    items = read_items(str(path))
    assert [it.error is None for it in items] == [False, True] and "not a JSON object" in items[0].error
    pretty = tmp_path / "bad.json"  # a pretty-printed array that is broken is still a whole-file error
    pretty.write_text("[\n  {\"problem\": \"p\",\n")
    with pytest.raises(SystemExit, match="not a valid JSON array"):
        read_items(str(pretty))


def test_verify_fast_flags_still_run(tmp_path, qwen2_dir):
    # the path checks let a normal run through: -o and --summary in an existing directory
    src = write_lines(tmp_path / "in.jsonl", [SOLUTION])
    proc = run_cli("verify", src, "--model", qwen2_dir, *FAST, "-o", str(tmp_path / "o.jsonl"), "--summary",
                   str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "s.json").read_text())["records"] == 1


class _Loaded(Exception):
    """Raised in place of loading a model: the command got past its checks."""


@pytest.fixture
def no_model(monkeypatch):
    def load(*a, **k):
        raise _Loaded
    monkeypatch.setattr("prmkern.cli.options.make_llm", load)  # the one factory every command calls


def test_triton_without_a_gpu_is_a_usage_error_before_the_model_loads(tmp_path, no_model, monkeypatch):
    # Before: the model loaded, then every record failed with TritonUnavailableError and the run exited 0.
    src = write_lines(tmp_path / "in.jsonl", [SOLUTION])
    monkeypatch.setattr("prmkern.kernels.interpreted", lambda: False)  # a process without TRITON_INTERPRET=1
    code, _, err = _main("verify", src, "--device", "cpu", "--attention-backend", "triton", "-o",
                         str(tmp_path / "o.jsonl"))
    assert code == 2 and err.startswith("prmkern verify: error: --attention-backend triton: ") and \
        "TRITON_INTERPRET=1" in err and "cpu" in err and err.count("\n") == 1, err
    monkeypatch.setattr("prmkern.kernels.interpreted", lambda: True)  # the interpreter runs it: on to the model
    with pytest.raises(_Loaded):
        _main("verify", src, "--device", "cpu", "--attention-backend", "triton", "-o", str(tmp_path / "o.jsonl"))


@pytest.mark.parametrize("fmt,says", [
    ({"base": "prmkern", "user_template": "{problme}\n{solution}"}, "user_template names unknown field(s) {problme}"),
    ({"base": "prmkern", "user_template": "{problem} {"}, "user_template is not a valid str.format template"),
    ({"base": "prmkern", "user_template": "{problem}{0}"}, "unknown field(s) {0}"),
    ({"base": "prmkern", "step_template": "Step {k}: {txt}"}, "step_template names unknown field(s) {txt}"),
    ({"base": "genprm", "user_template": "{text} of {solution}"}, "unknown field(s) {solution}; accepted for a "
                                                                  "per_paragraph format: {k}, {problem}, {text}"),
])
def test_a_formats_file_template_with_an_unknown_field_is_a_usage_error(tmp_path, no_model, fmt, says):
    # Before: the file loaded, the model loaded, then every record failed with KeyError: 'problme' (exit 0).
    src = write_lines(tmp_path / "in.jsonl", [SOLUTION])
    path = tmp_path / "f.json"
    path.write_text(json.dumps([{"name": "mine", **fmt}]))
    code, _, err = _main("verify", src, "--device", "cpu", "--formats-file", str(path), "--format", "mine")
    assert code == 2 and err.startswith(f"prmkern verify: error: --formats-file {path}: format 'mine': ") and \
        says in err and err.count("\n") == 1, err


def test_formats_file_templates_with_the_fields_they_are_given_still_load(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([
        {"base": "prmkern", "name": "ok1", "user_template": "{{braces}} {problem!r}\n{solution:>3}",
         "step_template": "({k:02d}) {text}"},
        {"base": "critic", "name": "ok2", "user_template": "{problem} {tagged_response}"},
        {"base": "thinkprm", "name": "ok3", "user_template": "{problme} is left as text by 'replace'"},
    ]))
    ok1, ok2, ok3 = load_formats(str(path), register=False)
    text = ok1.messages("P", ["a", "b"])[0]["content"]
    assert text == "{braces} 'P'\n" + "(01) a\n(02) b".rjust(3)
    assert ok2.messages("P", ["a"])[0]["content"].startswith("P ")
    assert "{problme}" in ok3.messages("P", ["a"])[0]["content"]


@pytest.mark.parametrize("command,record", [
    ("verify", SOLUTION), ("generate", {"prompt": "one two", "max_tokens": 2}), ("bon", {"problem": "What is 2+3?"}),
])
def test_a_second_run_on_a_locked_output_stops_before_its_model_loads(tmp_path, no_model, command, record):
    # Before: the lock was taken after the model loaded, so a second run spent the load and then stopped.
    src = write_lines(tmp_path / "in.jsonl", [record])
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "line": 1, "error": None}) + "\n")
    before = out.read_text()
    holder = os.open(out, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # what the first run holds while it writes
    try:
        for resume in ((), ("--resume",)):
            code, _, err = _main(command, src, "--device", "cpu", "-o", str(out), *resume)
            assert "being written by another run" in str(code), (code, err)
            assert out.read_text() == before
    finally:
        os.close(holder)


def test_a_run_that_fails_to_load_leaves_its_output_as_it_was(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise UsageError("no model here")
    monkeypatch.setattr("prmkern.cli.options.make_llm", fail)
    src = write_lines(tmp_path / "in.jsonl", [SOLUTION])
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    old.write_text(json.dumps({"index": 0, "line": 1, "error": None}) + "\n")
    before = old.read_text()
    for out in (new, old):
        code, _, err = _main("verify", src, "--device", "cpu", "-o", str(out))
        assert code == 2 and "no model here" in err, err
    assert not new.exists() and old.read_text() == before  # not created, not truncated


def test_an_interrupted_verify_summary_counts_the_chains_of_the_records_written(tmp_path, monkeypatch):
    # Before: Ctrl-C during the one continuous call over all records lost its count: "chains": 0.
    from prmkern.cli.verify_runs import ChainProgress
    recs = [json.loads(line) for line in open(EXAMPLES)][:6]
    src = write_lines(tmp_path / "in.jsonl", recs)
    out, summ = tmp_path / "out.jsonl", tmp_path / "s.json"

    def step_progress(self, chains):
        def on_step(finished):  # Ctrl-C at the first engine step after two rows were written
            if out.exists() and out.read_text().count("\n") >= 2:
                raise KeyboardInterrupt
        return on_step
    monkeypatch.setattr(ChainProgress, "step_progress", step_progress)
    code, _, err = _main("verify", src, *FAST, "--batch-size", "1", "-o", str(out), "--summary", str(summ))
    assert code == 130 and "interrupted" in err, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    s = json.loads(summ.read_text())
    assert s["interrupted"] and s["written"] == len(rows) and 2 <= len(rows) < len(recs)
    assert s["chains"] == sum(len(r["chains"]) for r in rows) > 0

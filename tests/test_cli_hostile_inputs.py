"""What an audit of the command line found on 2026-12-07, each a case that misbehaved before its fix: `report -o` its
own run file and `-o X --summary X` destroyed data with exit 0; a missing or directory input, an output in a missing
directory and a --summary path that could not be written gave tracebacks (the last after the whole job); -o
/dev/null failed on truncating a device; a string "stop" in a formats file became one stop per character;
`prompt_token_ids` given as a string ran as text; a JSONL whose first line is a JSON array failed the whole file;
serve's --port / --log-level / --max-n and several verify flags gave tracebacks or garbled messages. Each is checked
before a model loads unless the case needs one (the tiny random Qwen2 then)."""
from __future__ import annotations

import json

import pytest

from prmkern.cli.jobs import read_items
from prmkern.verify.formats import load_formats
from tests.test_cli import FAST, run_cli, write_lines

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

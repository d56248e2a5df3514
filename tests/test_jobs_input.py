"""Job inputs and outputs that must fail alone or be refused (issue 24, items 9 and 10): a JSON line nested past
the parser's recursion limit, a record holding a lone UTF-16 surrogate, an output path that is the input (by
realpath or a hard link), and two runs writing one output. Each reproduces a red-team case that broke the whole
job (or destroyed the input) before the fix."""
from __future__ import annotations

import fcntl
import json
import os

import pytest

from prmkern.cli.jobs import JobRunner, check_output_paths, read_items
from tests.test_cli import rows_of, run_cli, write_lines

DEEP = "[" * 100_000 + "]" * 100_000


def test_a_deep_json_line_fails_alone_with_its_line_number(tmp_path):
    # Before: json.loads raised RecursionError, which read_items did not catch: the job died with 0 rows.
    src = write_lines(tmp_path / "in.jsonl", [{"a": 0}, '{"x": ' + DEEP + "}", {"a": 2}, DEEP])
    items = read_items(src)
    assert [(it.line, it.error is None) for it in items] == [(1, True), (2, False), (3, True), (4, False)]
    assert "nested too deeply" in items[1].error and "nested too deeply" in items[3].error


def test_a_deep_json_array_file_is_refused_with_a_message(tmp_path):
    path = tmp_path / "in.json"
    path.write_text(DEEP)
    with pytest.raises(SystemExit, match="nested too deeply"):
        read_items(str(path))


def test_a_lone_surrogate_is_a_bad_record_at_reading(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "ok"}, '{"prompt": "a \\ud800 b"}',
                                              '{"steps": ["fine", {"k": "\\udfff"}], "problem": "p"}',
                                              '{"\\ud800": 1}'])
    items = read_items(src)
    assert [it.error is None for it in items] == [True, False, False, False]
    assert "prompt holds a lone surrogate '\\ud800'" in items[1].error
    assert "steps[1].k" in items[2].error and "a key" in items[3].error


def test_a_line_that_is_not_utf8_fails_alone_and_u2028_does_not_split_a_record(tmp_path):
    # Before: one invalid byte made reading the whole file raise UnicodeDecodeError (0 rows), and a raw U+2028 in
    # a JSON string split its record in two and shifted every later line number.
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 0}\n{"a": "caf\xe9"}\n' + '{"a": "x\u2028y"}\n'.encode() + b'{"a": 3}\r\n')
    items = read_items(str(path))
    assert [(it.line, it.error is None) for it in items] == [(1, True), (2, False), (3, True), (4, True)]
    assert "not UTF-8" in items[1].error and "column 11" in items[1].error
    assert items[2].record == {"a": "x\u2028y"} and items[3].record == {"a": 3}


def test_generate_lone_surrogate_fails_alone_not_its_batch(qwen2_dir, tmp_path):
    # Before: the tokenizer raised TypeError on the record and all 8 records of its batch failed.
    lines = [{"prompt": f"the step {i} is correct", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
             for i in range(8)]
    lines[3] = '{"prompt": "bad \\ud800 text", "max_tokens": 2}'
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", "--model", qwen2_dir, "--device", "cpu", src, "-o", str(out), "--no-progress",
                   "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr
    rows = {r["line"]: r for r in rows_of(out)}
    assert sorted(rows) == list(range(1, 9))
    assert [ln for ln, r in rows.items() if r["error"]] == [4]
    assert "lone surrogate" in rows[4]["error"] and "in.jsonl:4:" in proc.stderr
    assert all(len(rows[ln]["outputs"][0]["token_ids"]) == 2 for ln in rows if ln != 4)


def test_a_batch_that_raises_is_retried_record_by_record(tmp_path):
    items = read_items(write_lines(tmp_path / "in.jsonl", [{"a": i} for i in range(6)]))
    out = tmp_path / "out.jsonl"
    calls = []

    def process(batch, emit):
        calls.append([it.index for it in batch])
        if any(it.record["a"] == 4 for it in batch):
            raise TypeError("bad record in batch")
        for it in batch:
            emit(it.index, it.row(error=None))
    JobRunner(str(out)).run(items, process, batch_size=3)
    rows = {r["index"]: r for r in rows_of(out)}
    assert [i for i, r in rows.items() if r["error"]] == [4]
    assert "TypeError" in rows[4]["error"] and calls == [[0, 1, 2], [3, 4, 5], [3], [4], [5]]


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_output_equal_to_input_is_refused_before_writing(tmp_path, how):
    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "x"}] * 3)
    before = open(src).read()
    out = {"same": src, "symlink": str(tmp_path / "link.jsonl"), "hardlink": str(tmp_path / "hard.jsonl"),
           "dotted": str(tmp_path / "." / ".." / tmp_path.name / "in.jsonl")}[how]
    if how == "symlink":
        os.symlink(src, out)
    if how == "hardlink":
        os.link(src, out)
    with pytest.raises(SystemExit, match="is the input file"):
        check_output_paths([src], {"-o": out})
    with pytest.raises(SystemExit, match="is the input file"):
        JobRunner(out, resume=True, inputs=[src]).run(read_items(src), lambda b, e: None)
    assert open(src).read() == before


def test_cli_refuses_output_or_summary_equal_to_input_before_the_model_loads(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "x"}] * 3)
    before = open(src).read()
    for flags in (("-o", src), ("-o", str(tmp_path / "o.jsonl"), "--summary", src)):
        proc = run_cli("generate", "--model", "/nonexistent-model-dir", src, *flags, "--resume")
        assert proc.returncode != 0 and "is the input file" in proc.stderr, proc.stderr
        assert "nonexistent-model-dir" not in proc.stderr  # refused before the model was looked at
    assert open(src).read() == before and not (tmp_path / "o.jsonl").exists()


def test_a_second_run_on_a_locked_output_stops_without_touching_it(tmp_path):
    # Before: two --resume runs on one output interleaved, 192 duplicate rows, "25 succeeded of 24".
    src = write_lines(tmp_path / "in.jsonl", [{"a": i} for i in range(4)])
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "line": 1, "error": None}) + "\n")
    before = out.read_text()
    holder = os.open(out, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # what a first run holds while it writes
    try:
        for resume in (True, False):  # neither appends nor truncates
            with pytest.raises(SystemExit, match="being written by another run"):
                JobRunner(str(out), resume=resume).run(read_items(src), lambda b, e: None)
            assert out.read_text() == before
    finally:
        os.close(holder)
    runner = JobRunner(str(out), resume=True)
    runner.run(read_items(src), lambda b, emit: [emit(it.index, it.row(error=None)) for it in b])
    assert sorted(r["index"] for r in rows_of(out)) == [0, 1, 2, 3] and runner.skipped == 1

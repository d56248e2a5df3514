"""The README, run: every command in a ```bash block and every ```python snippet runs (with small settings) and must
succeed; every ```json example is valid and matches what the program reads or writes; every relative link resolves.

Commands that need what a test machine lacks are not run, and the reason is derived from the command itself and
asserted: `--device cuda` needs a GPU; a `--model DIR` that is not a local checkpoint needs a downloaded checkpoint;
`scripts/run_tests.sh` is this very suite. Small settings are appended (argparse keeps the last value of an option):
few records, one or two chains, few tokens, one thread.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
# docs other sessions write in parallel; the README links to them before they land
PENDING_DOCS = {"docs/verifiers.md", "docs/sandbox.md", "docs/api.md", "docs/server.md", "docs/distributed.md",
                "docs/cpu_kernels.md", "docs/gpu_kernels.md"}
CPU = ["--device", "cpu", "--threads", "1", "--no-progress"]
SMALL = {"verify": ["--limit", "2", "--chains", "1", *CPU],
         "eval": ["--limit", "2", "--chains", "1", *CPU],
         "bon": ["--limit", "1", "--n", "2", "--gen-max-tokens", "16", "--chains", "1", *CPU],
         "generate": ["--limit", "2", *CPU],
         "demo": ["--chains", "2", "--prompt-len", "32", "--gen-len", "4", *CPU]}


def blocks(lang: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced block of the language in the README."""
    out, lines = [], open(README).read().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            out.append((i + 2, "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def commands() -> list[tuple[int, str]]:
    out = []
    for start, text in blocks("bash"):
        for k, line in enumerate(text.splitlines()):
            cmd = re.split(r"\s+#\s", line.strip(), maxsplit=1)[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append((start + k, cmd))
    return out


def not_run_reason(cmd: str) -> str | None:
    words = shlex.split(cmd)
    if words[:2] == ["bash", "scripts/run_tests.sh"]:
        return "runs this very test suite"
    if "--device" in words and words[words.index("--device") + 1].startswith("cuda"):
        return "needs a GPU"
    if "--model" in words:
        model = words[words.index("--model") + 1]
        if not os.path.isfile(os.path.join(REPO, model, "config.json")):
            return f"needs a downloaded checkpoint ({model})"
    return None


def test_the_readme_leads_with_the_two_setup_commands():
    first = commands()[:2]
    assert [c for _, c in first] == ["bash scripts/run_demo.sh", "bash scripts/run_tests.sh"]


def test_commands_not_run_are_the_ones_that_cannot_run_here():
    skipped = {cmd: not_run_reason(cmd) for _, cmd in commands() if not_run_reason(cmd)}
    for cmd, reason in skipped.items():
        words = shlex.split(cmd)
        if reason.startswith("needs a GPU"):
            assert "cuda" in cmd
        elif reason.startswith("needs a downloaded checkpoint"):
            assert "--model" in words and not os.path.isdir(os.path.join(REPO, words[words.index("--model") + 1]))
        else:
            assert reason == "runs this very test suite" and "run_tests.sh" in cmd
    # everything else (most of the README) runs
    assert len(skipped) <= len(commands()) // 3, skipped


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's directory: the README's own JSON examples as the input files it names."""
    d = tmp_path_factory.mktemp("readme")
    files: dict[str, list[str]] = {}
    for _, text in blocks("json"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if all("problem" in r and "steps" in r for r in rows):
            files["my.jsonl"] = [json.dumps(r) for r in rows]
        elif all("prompt" in r or "prompt_token_ids" in r for r in rows):
            files["prompts.jsonl"] = [json.dumps(r) for r in rows]
        elif all("base" in r for r in rows):
            files["my_formats.json"] = [json.dumps(rows)]
    assert set(files) == {"my.jsonl", "prompts.jsonl", "my_formats.json"}, sorted(files)
    for name, lines in files.items():
        (d / name).write_text("\n".join(lines) + "\n")
    sample = [json.loads(x) for x in open(os.path.join(REPO, "prmkern/data/processbench_sample.jsonl"))]
    (d / "gsm8k.json").write_text(json.dumps([r for r in sample if str(r["id"]).startswith("gsm8k")]))
    (d / "math.json").write_text(json.dumps([r for r in sample if str(r["id"]).startswith("math")]))
    (d / "problems.jsonl").write_text(json.dumps({"problem": "What is 2 + 3?", "answer": "5"}) + "\n")
    return d


def _argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    if words[:2] == ["bash", "scripts/run_demo.sh"]:
        # the script sets up .venv (pip) and then execs exactly this; the test runs the exec'd command
        script = open(os.path.join(REPO, "scripts/run_demo.sh")).read().strip().splitlines()[-1]
        assert script == 'exec .venv/bin/prmkern verify --device cpu --no-chains "$@"', script
        words = ["prmkern", "verify", "--device", "cpu", "--no-chains", *words[2:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    assert words[0] == "prmkern", f"a README command this test does not know how to run: {cmd}"
    small = list(SMALL.get(words[1], []))
    if words[1] in ("verify", "eval", "bon") and "--budget-tokens" not in words:
        small += ["--max-tokens", "48"]  # the shipped verifier's chains run ~150 tokens; a cut chain still scores
    for option in ("--limit", "--chains", "--max-tokens"):  # the README's own small setting is kept (it is chosen:
        if option in words and option in small:             # a slice with errors, chains long enough for verdicts)
            del small[small.index(option):small.index(option) + 2]
    return [sys.executable, "-m", "prmkern.cli", *words[1:], *small]


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_server_command(argv: list[str], workdir) -> None:
    """`prmkern serve ...` from the README: it must come up on loopback, answer a completion with the README's API
    key, and stop cleanly on SIGTERM."""
    import signal
    import time

    import httpx
    port = _free_port()
    words = argv[argv.index("serve"):]
    key = words[words.index("--api-key") + 1] if "--api-key" in words else None
    proc = subprocess.Popen([*argv, "--port", str(port), "--device", "cpu", "--threads", "1"], cwd=workdir, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the README's server did not come up in 180 s"
            time.sleep(0.5)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                       json={"model": "verifier", "prompt": "Compute 2 + 3.", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn finishes its graceful shutdown, then re-raises the SIGTERM it caught (exit status -15)
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in err, err[-3000:]


@pytest.mark.parametrize("lineno,cmd", commands(), ids=[f"README:{n}" for n, _ in commands()])
def test_readme_command_runs(lineno, cmd, workdir):
    reason = not_run_reason(cmd)
    if reason:
        pytest.skip(f"not run: {reason}")
    argv = _argv(cmd)
    if "serve" in argv[:4]:
        _run_server_command(argv, workdir)
        return
    proc = subprocess.run(argv, cwd=REPO if argv[1].endswith((".py",)) else workdir, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README line {lineno}: {cmd}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    # Run with the README's own chain settings (not shrunk by this test), labelled output is meaningful: no nan F1.
    # (a --formats-file example shows the file's shape: its verdict words are not the shipped verifier's; an `eval
    # processbench` example runs real ProcessBench records, which the shipped verifier, trained on synthetic
    # arithmetic, cannot judge: both accuracies can be 0, and ProcessBench's F1 of 0 and 0 is nan)
    if "--max-tokens" in shlex.split(cmd) and "--formats-file" not in cmd and "eval processbench" not in cmd:
        f1_lines = [line for line in proc.stderr.splitlines() if "F1" in line]
        assert not any("nan" in line for line in f1_lines), f"README line {lineno} prints a nan F1: {f1_lines}"
    assert "--resume" in cmd or not re.search(r"(?<![\d.])0(\.0+)? chains/s", proc.stderr), \
        f"README line {lineno} reports no chains: {proc.stderr[-500:]}"
    out = re.search(r"-o (\S+)", cmd)
    if out:  # every row of every output names its record and whether it failed
        rows = [json.loads(line) for line in (workdir / out.group(1)).read_text().splitlines()]
        assert rows and all({"index", "line", "id", "error"} <= set(r) for r in rows)


@pytest.mark.parametrize("lineno,code", blocks("python"), ids=[f"README:{n}" for n, _ in blocks("python")])
def test_readme_python_snippet_runs(lineno, code):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README line {lineno}:\n{proc.stderr[-3000:]}"


def test_readme_verify_row_example_has_the_fields_verify_writes(workdir):
    example = [json.loads(t) for _, t in blocks("json") if '"step_scores"' in t]
    assert len(example) == 1
    out = workdir / "example_row.jsonl"
    proc = subprocess.run([sys.executable, "-m", "prmkern.cli", "verify", "my.jsonl", "--no-chains", "-o", str(out),
                           "--max-tokens", "16", *SMALL["verify"]], cwd=workdir, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text().splitlines()[0])
    assert set(example[0]) == set(row), (sorted(set(example[0]) ^ set(row)))


def test_curl_examples_send_json_with_its_content_type():
    """A curl that posts a body must say it is JSON: the server answers 400 to a form-encoded body."""
    docs = [README] + [os.path.join(REPO, "docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs")))
                       if f.endswith(".md")]  # docs/ also holds images (docs/img/)
    posts = [(path, line) for path in docs for line in open(path).read().splitlines()
             if line.lstrip().startswith("curl") and " -d " in line]
    assert posts, "no curl example found: the scan is wrong"
    for path, line in posts:
        assert "content-type: application/json" in line.lower(), f"{os.path.basename(path)}: {line}"


def test_readme_samples_are_scored_as_labelled_by_the_shipped_verifier(workdir):
    """The README's my.jsonl uses the shipped verifier's trained wording: it finds the labelled error and passes the
    correct solution (F1 defined and not nan)."""
    out = workdir / "labelled.jsonl"
    proc = subprocess.run([sys.executable, "-m", "prmkern.cli", "verify", "my.jsonl", "--no-chains", "-o", str(out),
                           "--chains", "4", "--device", "cpu", "--threads", "1", "--no-progress"], cwd=workdir,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    labels = [json.loads(line).get("label") for line in (workdir / "my.jsonl").read_text().splitlines()]
    assert -1 in labels and any(lab is not None and lab >= 0 for lab in labels)
    assert [r["prediction"] for r in rows] == labels
    assert "mean F1: 1.0000" in proc.stderr


def test_readme_links_resolve():
    text = open(README).read()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            assert anchor in anchors, f"README link to a missing section: #{anchor}"
        elif path not in PENDING_DOCS:
            assert os.path.exists(os.path.join(REPO, path)), f"README links to a missing file: {path}"

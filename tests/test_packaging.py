"""The package as a new user meets it: no name collision with PyPI's `kernels`, imports and the console script from
any directory, a wheel that carries the Triton kernels, the C++ sources and the data, and the engine's greedy tokens
equal to transformers' whether Python starts in the checkout's root or elsewhere.

Each check runs in a fresh interpreter (subprocess), because what matters is what `sys.path` holds at start-up:
`python -m` and pytest put the current directory first, which is how the checkout's old top-level `kernels/`
package shadowed the `kernels` package that transformers >= 5.25 imports.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, timeout: float = 300) -> str:
    """`python -c code` in cwd (which Python puts first on sys.path), with this interpreter; returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if os.environ.get("PYTHONPATH"):  # a run from another clone keeps its prmkern, but never the cwd trick
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode} in {cwd}:\n{out.stderr[-3000:]}"
    return out.stdout


def test_checkout_root_never_shadows_a_package_named_kernels():
    """From the checkout's root (first on sys.path), `kernels` is never the checkout's folder as a regular package:
    the installed PyPI package when there is one, else at most an empty namespace."""
    report = json.loads(run_python(
        "import importlib.util, json; s = importlib.util.find_spec('kernels');"
        "print(json.dumps(None if s is None else {'origin': s.origin,"
        " 'locations': list(s.submodule_search_locations or [])}))", cwd=REPO))
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must not be a regular package"
    if report is not None and report["origin"] not in (None, "namespace"):
        assert not Path(report["origin"]).resolve().is_relative_to(REPO / "kernels"), report
    try:
        dist = distribution("kernels")
    except PackageNotFoundError:
        return
    # transformers >= 5.25 depends on it: the real package must be what `import kernels` gives, from the root too
    files = run_python("import kernels; print(kernels.__file__)", cwd=REPO).strip()
    assert Path(files).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve(), files


def test_prmkern_kernels_importable_from_any_directory(tmp_path):
    pytest.importorskip("triton")
    for cwd in (REPO, tmp_path):
        out = run_python("import prmkern.kernels as K; from prmkern.kernels.paged_decode import paged_decode;"
                         "print(K.paged_decode is paged_decode, sorted(K.__all__)[:2])", cwd=cwd)
        assert out.strip() == "True ['cascade_decode', 'interpreted']", (cwd, out)


def test_console_script_version_from_another_directory(tmp_path):
    script = Path(sys.executable).with_name("prmkern")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (prmkern is not pip-installed here)")
    import prmkern
    out = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"prmkern {prmkern.__version__}"


def test_console_script_verify_from_another_directory(tmp_path):
    """`prmkern verify` on the shipped verifier, started outside the checkout: its data comes from the package."""
    script = Path(sys.executable).with_name("prmkern")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (prmkern is not pip-installed here)")
    out = subprocess.run([str(script), "verify", "--limit", "1", "--chains", "1", "--device", "cpu", "--threads", "1",
                          "--no-progress", "--no-chains", "-o", "rows.jsonl"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["error"] is None and len(row["step_scores"]) == 3, row


def test_greedy_tokens_equal_transformers_from_root_and_elsewhere(qwen2_dir, tmp_path):
    """The engine (through whatever `import prmkern` resolves to from cwd) against transformers' generate on the same
    random Qwen2, in a fresh interpreter started in the checkout's root and in an unrelated directory."""
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
from prmkern import LLM, SamplingParams, TokensPrompt
prompt = [3, 17, 5, 101, 44, 9, 250, 7]
hf = AutoModelForCausalLM.from_pretrained({qwen2_dir!r}, dtype=torch.float32).eval()
with torch.no_grad():
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones(1, len(prompt)))[0, len(prompt):].tolist()
llm = LLM({qwen2_dir!r}, device="cpu", dtype="float32")
out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=12, temperature=0.0,
                   ignore_eos=True), use_tqdm=False)
print(json.dumps([ref, list(out[0].outputs[0].token_ids)]))
"""
    for cwd in (REPO, tmp_path):
        ref, ours = json.loads(run_python(code, cwd=cwd).strip().splitlines()[-1])
        assert len(ref) == 12 and ours == ref, (cwd, ours, ref)


@pytest.fixture(scope="module")
def tracked_tree(tmp_path_factory) -> Path:
    """A copy of the files git tracks (what a clone or an sdist starts from), without build outputs."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the tracked tree")
    src = tmp_path_factory.mktemp("tracked") / "prmkern-src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    return src


def test_wheel_carries_kernels_csrc_data_and_license(tracked_tree, tmp_path):
    """`pip wheel .` (the extension skipped to keep the test fast: PRMKERN_NO_CSRC=1) holds the Triton kernels next
    to prmkern/kernels/__init__.py, every C++ source and header for a build on first use, the shipped verifier,
    and the license, with no top-level `kernels` package."""
    env = dict(os.environ, PRMKERN_NO_CSRC="1")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(tracked_tree)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("prmkern-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {p.name for p in (REPO / "kernels").glob("*.py")}
    assert kernels and {f"prmkern/kernels/{k}" for k in kernels} <= names
    assert "prmkern/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package would shadow PyPI's"
    csrc = {p.name for pat in ("*.cpp", "*.h", "*.inc") for p in (REPO / "csrc").glob(pat)}
    assert {f"prmkern/_csrc/{c}" for c in csrc} <= names, sorted(csrc - {n.split("/")[-1] for n in names})
    assert "prmkern/data/verifier/model.safetensors" in names
    assert any(n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n for n in names), sorted(names)[-8:]


def test_sdist_carries_every_source_a_build_needs(tracked_tree, tmp_path):
    """The sdist (PEP 517 build_sdist) holds kernels/, all of csrc/ (headers and .inc fragments too), the lock and
    the license: a wheel built from it is the same as one built from the clone."""
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tracked_tree, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PRMKERN_NO_CSRC="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    with tarfile.open(tmp_path / out.stdout.strip().splitlines()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {f"csrc/{p.name}" for pat in ("*.cpp", "*.h", "*.inc") for p in (REPO / "csrc").glob(pat)}
    wanted |= {f"kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    wanted |= {"LICENSE", "pyproject.toml", "setup.py", "prmkern/kernels/__init__.py"}
    wanted |= {f"constraints/{p.name}" for p in (REPO / "constraints").glob("*.txt")}
    assert wanted <= names, sorted(wanted - names)

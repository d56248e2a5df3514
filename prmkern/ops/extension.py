"""Finding the C++ CPU kernels: the extension built at install time, else one built here on first use, else None.

An install with `--no-build-isolation` (scripts/setup_env.sh) compiles csrc/ into `prmkern._C` against the
installed torch. An install from a wheel or sdist built in an isolated environment has no torch at build time, so
it ships the sources instead (setup.py copies csrc/ into `prmkern/_csrc/`); the first process that needs the
kernels compiles them with the same flags (setuptools + a C++ compiler, no ninja) into the cache
(`$PRMKERN_CACHE/csrc-<key>`, default ~/.cache/prmkern), keyed by the sources, the torch version and the Python
ABI, and later processes load that build. A failed build is remembered under the same key, so it is reported once
and not retried until the sources or torch change.

Environment: PRMKERN_DISABLE_CPP=1 never loads the kernels (A/B runs); PRMKERN_BUILD_CPP=0 never compiles them
at run time. Neither this module nor the kernels choose an instruction set at build time: csrc/ dispatches at run
time (AVX2 / AVX-512 / AVX-512 BF16), so one build serves every x86 machine.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

_PACKAGE = Path(__file__).resolve().parents[1]
SOURCE_PATTERNS = ("*.cpp", "*.h", "*.inc")
COMPILE_ARGS = ["-O3", "-fopenmp"]
LINK_ARGS = ["-fopenmp"]

_loaded: ModuleType | None = None
_tried = False
why_unavailable: str | None = None  # set when load() returned None: the reason, in words


def cache_root() -> Path:
    return Path(os.environ.get("PRMKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prmkern")))


def source_dir() -> Path | None:
    """csrc/ of a source checkout (editable installs), else the copy a wheel carries, else None."""
    for d in (_PACKAGE.parent / "csrc", _PACKAGE / "_csrc"):
        if (d / "binding.cpp").is_file():
            return d
    return None


def _build_key(src: Path) -> str:
    import torch

    h = hashlib.sha256()
    for p in sorted(f for pat in SOURCE_PATTERNS for f in src.glob(pat)):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(f"{torch.__version__}|{sysconfig.get_config_var('EXT_SUFFIX')}|{COMPILE_ARGS}".encode())
    return h.hexdigest()[:16]


def _import_built(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("prmkern._C", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["prmkern._C"] = module
    return module


def _compile(src: Path, out: Path) -> None:
    """csrc/*.cpp -> out/prmkern/_C*.so with setuptools' compiler driver, as setup.py would (no ninja needed)."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(str(p) for p in src.glob("*.cpp"))
    ext = CppExtension("prmkern._C", sources, extra_compile_args=COMPILE_ARGS, extra_link_args=LINK_ARGS)
    dist = Distribution({"name": "prmkern-csrc", "ext_modules": [ext],
                         "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=False)}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = str(out)
    cmd.build_temp = tempfile.mkdtemp(prefix="prmkern-csrc-")
    cmd.parallel = os.cpu_count() or 1
    dist.run_command("build_ext")


@contextlib.contextmanager
def _output_to(path: Path):
    """Points file descriptors 1 and 2 (so the compiler subprocesses' output too) at path while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _build_on_first_use() -> ModuleType | None:
    global why_unavailable
    src = source_dir()
    if src is None:
        why_unavailable = "prmkern._C is not installed and no C++ sources ship with this install"
        return None
    if os.environ.get("PRMKERN_BUILD_CPP") == "0":
        why_unavailable = "prmkern._C is not installed and PRMKERN_BUILD_CPP=0 forbids building it here"
        return None
    out = cache_root() / f"csrc-{_build_key(src)}"
    out.mkdir(parents=True, exist_ok=True)
    failed = out / "FAILED"
    with open(out / ".lock", "w") as lock:  # one builder at a time; the others wait and then load its build
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = glob.glob(str(out / "prmkern" / "_C*.so"))
        if not built and not failed.exists():
            print(f"prmkern: building the C++ CPU kernels for this torch (once: a few minutes; cached in {out})",
                  file=sys.stderr)
            t0 = time.perf_counter()
            log = out / "build.log"
            try:
                with _output_to(log):  # the compiler's warnings go to the log, not to the user's terminal
                    _compile(src, out)
            except BaseException as e:  # a missing compiler or headers: remember it, use the torch path
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                failed.write_text(f"{type(e).__name__}: {e} (compiler output: {log})\n{tail}")
            else:
                print(f"prmkern: C++ CPU kernels built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            built = glob.glob(str(out / "prmkern" / "_C*.so"))
    if not built:
        reason = failed.read_text().splitlines()[0] if failed.exists() else "no library was produced"
        why_unavailable = (f"building csrc/ failed ({reason}); remove {out} to retry, after installing a C++ "
                           f"compiler with OpenMP (g++)")
        return None
    try:
        return _import_built(built[0])
    except ImportError as e:
        why_unavailable = f"the build in {out} does not load ({e}); remove that folder to rebuild it"
        return None


def load() -> ModuleType | None:
    """The C++ kernels module, or None (with `why_unavailable` set and one line on stderr) when it cannot be had."""
    global _loaded, _tried, why_unavailable
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get("PRMKERN_DISABLE_CPP") == "1":
        why_unavailable = "PRMKERN_DISABLE_CPP=1"
        return None
    try:
        from prmkern import _C  # type: ignore[attr-defined]
        _loaded = _C
    except ImportError as e:
        if "_C" not in str(e):  # the module exists but does not load (another torch's ABI): rebuild it here
            print(f"prmkern: the installed C++ kernels do not load ({e})", file=sys.stderr)
        _loaded = _build_on_first_use()
        if _loaded is None:
            print(f"prmkern: C++ CPU kernels unavailable: {why_unavailable}; using the torch path", file=sys.stderr)
    return _loaded

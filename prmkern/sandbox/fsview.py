"""The filesystem view of the namespace modes: exactly what the child interpreter needs, read-only.

The interpreter is asked for its own paths (``sys.prefix``, ``sys.base_prefix``, the exec prefixes,
``sys.executable`` and ``sys.path`` of ``python -I``), once per interpreter path, so a second virtual
environment symlinked to the same base Python is seen with its own site-packages, not mistaken for the
engine's. The plan binds those directories (and their real paths, when a symlink leads there; of sys.path
only entries under a prefix or named site-packages / dist-packages, never a project root), the system
library directories the dynamic loader searches, /etc/ld.so.cache and five device nodes; child_setup.py
mounts it. Nothing else of the host has a path inside: no project or home directory, no model files, no
/run or /tmp with their UNIX sockets, no /etc/passwd.

It does not hide files inside the exposed directories (an installed package's own files are readable).
"""
from __future__ import annotations

import json
import os
import subprocess
import threading

_LIB_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/local/lib")
_FILES = ("/etc/ld.so.cache",)
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_PROBE = ("import sys, json; print(json.dumps({'prefix': sys.prefix, 'base_prefix': sys.base_prefix, "
          "'exec_prefix': sys.exec_prefix, 'base_exec_prefix': sys.base_exec_prefix, "
          "'executable': sys.executable, 'path': sys.path}))")

_cache: dict[str, dict] = {}
_lock = threading.Lock()


def interpreter_paths(python: str) -> dict:
    """The interpreter's own answer: prefixes, executable and sys.path under ``-I`` (cached per path)."""
    key = os.path.abspath(python)
    with _lock:
        if key not in _cache:
            try:
                out = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60,
                                     env={"PATH": "/usr/bin:/bin"}, check=True).stdout
            except (OSError, subprocess.SubprocessError) as e:
                raise ValueError(f"cannot run the sandbox interpreter {python!r}: {e}") from e
            _cache[key] = json.loads(out)
        return _cache[key]


def is_venv(python: str) -> bool:
    """True when the interpreter runs in a virtual environment (its prefix differs from its base prefix)."""
    p = interpreter_paths(python)
    return os.path.realpath(p["prefix"]) != os.path.realpath(p["base_prefix"])


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _package_dir(entry: str, prefixes: list[str]) -> bool:
    """A sys.path entry worth exposing: under one of the interpreter's prefixes, or a site-packages /
    dist-packages directory (another environment's, added by a .pth). Anything else, such as a project root
    an editable install's .pth puts on sys.path, stays out of the view (its packages are not importable)."""
    real = os.path.realpath(entry)
    if os.path.basename(real.rstrip("/")) in ("site-packages", "dist-packages"):
        return True
    return any(_is_under(v, pre) for pre in prefixes for v in (os.path.normpath(entry), real))


def needed_dirs(python: str) -> list[str]:
    """Directories the interpreter reads, as it names them and as they resolve."""
    p = interpreter_paths(python)
    prefixes = [p["prefix"], p["base_prefix"], p["exec_prefix"], p["base_exec_prefix"]]
    prefixes += [os.path.realpath(x) for x in prefixes]
    raw = [*prefixes, os.path.dirname(p["executable"]), os.path.dirname(os.path.abspath(python)),
           *(e for e in p["path"] if e and _package_dir(e, prefixes))]
    out: set[str] = set()
    for d in raw:
        if not d or not os.path.isabs(d):
            continue
        for v in (os.path.normpath(d), os.path.realpath(d)):
            if os.path.isdir(v):
                out.add(v)
    return sorted(out)


def others_can_run(python: str) -> bool:
    """Whether a uid with no rights of its own can read the interpreter's directories (mode none as root
    drops to a private uid only then: without a mount namespace nothing can be bound in)."""
    for d in needed_dirs(python):
        path = "/"
        for part in [p for p in d.split("/") if p]:
            path = os.path.join(path, part)
            try:
                if not os.stat(path).st_mode & 0o001:
                    return False
            except OSError:
                return False
        if not os.stat(d).st_mode & 0o004:
            return False
    return True


def fs_plan(python: str) -> list[list[str]]:
    """[kind, source, target] entries for child_setup.build_root, outermost directories first.

    kind: "dir" (read-only bind), "file" (read-only bind), "dev" (bind, writable), "symlink" (source is the
    link's text). A directory under another planned one is not bound twice."""
    plan: list[list[str]] = []
    dirs: list[str] = []
    for d in _LIB_DIRS:
        if os.path.islink(d):  # merged /usr: /lib -> usr/lib, kept as a link inside too
            plan.append(["symlink", os.readlink(d), d])
            dirs.append(os.path.realpath(d))
        elif os.path.isdir(d):
            dirs.append(d)
    for d in needed_dirs(python):
        dirs.append(d)
    kept: list[str] = []
    for d in sorted(set(dirs), key=lambda x: (x.count("/"), x)):
        if not any(_is_under(d, k) for k in kept):
            kept.append(d)
    # Paths that reach a kept directory through a symlinked component (e.g. /lib/x -> /usr/lib/x) resolve
    # through the symlinks above; a directory only reachable through its real path is bound at both.
    plan += [["dir", d, d] for d in kept]
    plan += [["file", f, f] for f in _FILES if os.path.isfile(f)]
    plan += [["dev", d, d] for d in _DEVICES if os.path.exists(d)]
    return plan

"""docs/reference.md is what prmkern.cli.reference generates from the code (flags from the argparse parser, env vars,
metrics), and every environment variable the code reads is listed in prmkern/env.py."""
from __future__ import annotations

import os
import re

from prmkern.cli.reference import render
from prmkern.env import ENV_VARS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_page_is_current():
    with open(os.path.join(ROOT, "docs", "reference.md"), encoding="utf-8") as f:
        current = f.read()
    assert current == render(), "docs/reference.md is stale: run python -m prmkern.cli.reference > docs/reference.md"


def test_every_environment_variable_read_is_documented():
    read = set()
    constants = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "prmkern")):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                src = f.read()
            constants.update(re.findall(r'^(\w+_ENV) = "(\w+)"', src, re.M))
            read |= set(re.findall(r'environ(?:\.get|\.setdefault)?\(\s*"(\w+)"', src))
            read |= set(re.findall(r'environ\["(\w+)"\]', src))
            read |= set(re.findall(r'getenv\(\s*"(\w+)"', src))
            for const in re.findall(r"environ(?:\.get)?\(\s*(\w+_ENV)\b", src):
                read.add(constants.get(const, const))
            read |= {k for k in re.findall(r'for k in \(([^)]*)\)', src) for k in re.findall(r'"(\w+)"', k)
                     if "os.environ" in src}
    assert read, "the scan found nothing: the patterns are wrong"
    missing = sorted(read - set(ENV_VARS))
    assert not missing, f"environment variables read but not in prmkern/env.py: {missing}"
    for name in ("PRMKERN_CACHE", "PRMKERN_API_KEY", "PRMKERN_DP_TIMEOUT_S"):
        assert f"`{name}`" in render()

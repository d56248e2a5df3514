"""docs/reference.md, generated from the code: every command's flags (from the argparse parser itself), every
environment variable (prmkern/env.py) and every metric (prmkern/metrics.py and the server's own,
prmkern/serve/metrics.py). `python -m prmkern.cli.reference > docs/reference.md` rewrites it;
tests/test_reference_doc.py fails when the file differs from what this prints."""
from __future__ import annotations

import argparse

from prmkern.cli.entry import build_parser
from prmkern.env import ENV_VARS
from prmkern.metrics import METRICS, PREFIX
from prmkern.serve.metrics import ENGINE_COUNTERS, SERVER_METRICS

HEADER = """# Reference: flags, environment variables, metrics

Generated from the code by `python -m prmkern.cli.reference > docs/reference.md`; do not edit by hand
(tests/test_reference_doc.py checks that it is current).
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _subparsers(sub)
                if nested:
                    out.update({f"{name} {k}": v for k, v in nested.items()})
                else:
                    out[name] = sub
    return out


def _flag_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
        # defaults read from the environment (--api-key) are not printed: the page must not depend on (or leak) it
        from_env = action.dest == "api_key"
        default = "" if from_env or action.default in (None, argparse.SUPPRESS, False) \
            else f" (default: `{action.default}`)"
        text = (action.help or "").replace("%%", "%").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {names} | {text}{default} |")
    return rows


def render() -> str:
    parts = [HEADER, "## Commands and flags\n"]
    for name, sub in sorted(_subparsers(build_parser()).items()):
        parts.append(f"### `prmkern {name}`\n\n| flag | meaning |\n|---|---|")
        parts += _flag_rows(sub)
        parts.append("")
    parts.append("## Environment variables\n\n| variable | meaning |\n|---|---|")
    parts += [f"| `{k}` | {v} |" for k, v in ENV_VARS.items()]
    parts.append("\n## Metrics\n\nvLLM's metrics under the `prmkern:` prefix (`vllm:X` is `prmkern:X`), labelled "
                 "`model_name`; the same in `LLM.get_metrics()` (counters there lack the `_total` suffix) and in the "
                 "server's `/metrics`.\n\n| metric | type | meaning |\n|---|---|---|")
    for name, (kind, help_) in METRICS.items():
        suffix = "_total" if kind == "counter" else ""
        parts.append(f"| `{PREFIX}{name}{suffix}` | {kind} | {help_} |")
    parts.append("\nThe server's own (`/metrics` only):\n\n| metric | type | meaning |\n|---|---|---|")
    for name, (kind, help_) in SERVER_METRICS.items():
        parts.append(f"| `{name}` | {kind} | {help_} |")
    for name, help_ in ENGINE_COUNTERS.values():
        parts.append(f"| `{name}` | counter | {help_} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")

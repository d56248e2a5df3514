"""prmkern's command line: `prmkern generate|verify|eval|bon|serve|demo` (the `prmkern` console script).

entry.py: the parser and `main` (not main.py: the console script names `prmkern.cli:main`, and a submodule of that
name would be shadowed by the function). options.py: the options every command shares, the engine's derived from
EngineConfig, and the one `make_llm`. The commands: generate.py (generate, demo), verify.py (verify, eval
processbench), bon.py, serve.py. jobs.py: the JSONL job runner every command that reads a file uses, with its
data-parallel mode (shards.py); report.py: what a job prints. The command line imports the API (prmkern.LLM,
prmkern.verify, prmkern.engine's step driver); nothing outside this package imports it.
"""
from prmkern.cli.entry import main
from prmkern.cli.options import UsageError

__all__ = ["UsageError", "main"]

"""prmkern's command line: `prmkern generate|verify|eval|bon|serve|demo` (the `prmkern` console script).

entry.py: the parser and `main` (not main.py: the console script names `prmkern.cli:main`, and a submodule of that
name would be shadowed by the function); verify.py and commands.py: the verification commands; jobs.py: the JSONL
job runner every command that reads a file uses; serve.py: `prmkern serve`. The command line imports the API
(prmkern.LLM, prmkern.verify); nothing outside this package imports it.
"""
from prmkern.cli.entry import UsageError, main

__all__ = ["UsageError", "main"]

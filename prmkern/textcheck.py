"""Text that no tokenizer can take: lone UTF-16 surrogates.

JSON may carry "\\ud800" (an escape for half of a UTF-16 pair); Python decodes it into a str that UTF-8 cannot
encode, and a tokenizer then raises (TypeError in the fast tokenizers) deep inside a batch. Inputs are checked
where they enter (job records: prmkern/cli/jobs.py; HTTP bodies: prmkern/serve/protocol.py) so such a record or
request fails alone with a message naming the field. This module only finds them; it raises nothing.
"""
from __future__ import annotations

from typing import Any


def find_lone_surrogate(value: Any) -> tuple[str, str] | None:
    """(where, the surrogate as repr) of the first lone surrogate in a parsed JSON value (str, list, dict, nested at
    any depth: the walk is iterative), or None. `where` is a path such as "steps[1].k" ("" for the value itself;
    a dict key is reported as "<path> (a key)")."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return where, repr(v[e.start])
        elif isinstance(v, dict):
            for k, x in v.items():
                key = f"{where}.{k}" if where else str(k)
                stack.append((key, x))
                if isinstance(k, str):
                    stack.append((f"{where or 'the object'} (a key)", k))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return None

"""Quoting code output before it is pasted into a verifier's chain, so that it cannot be read as a verdict.

The code's output goes back to the model as text, and the protocols later parse the whole chain with regexes
(``\\boxed{...}`` verdicts, ``**Judgement**``, markdown code fences, chat special tokens). ``quote_output``
breaks every place where such a pattern could start inside the output by inserting U+2060 WORD JOINER (an
invisible, zero-width character) after its first character, so the text reads the same to a person and the
model but no longer matches:

* always: a backslash followed by a letter (every LaTeX command, hence every ``\\boxed``), a run of three
  backticks (a fence that would close the output block or open a fake code block), and ``<|`` (the start of
  chat special tokens such as ``<|im_end|>``);
* ``reserved``: exact strings that must not occur (e.g. the tokenizer's added/special tokens, ``</output>``);
* ``patterns``: regexes that must not match anywhere in the result (e.g. the format's verdict, final-answer
  and code regexes). A pattern that matches the empty string cannot be excluded and raises ValueError.

Postcondition (tested): no pattern matches, no reserved string occurs, no default trigger remains. The text
is otherwise unchanged (no escaping of ordinary characters, so numbers, dicts and tracebacks read as printed).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

JOINER = "\u2060"
_DEFAULT = re.compile(r"\\(?=[A-Za-z])|`(?=``)|<(?=\|)")


def _break_at(text: str, positions: Iterable[int]) -> str:
    """Inserts the joiner after each given index (sorted, unique)."""
    out, last = [], 0
    for p in sorted(set(positions)):
        out.append(text[last:p + 1])
        out.append(JOINER)
        last = p + 1
    out.append(text[last:])
    return "".join(out)


def quote_output(text: str, *, reserved: Iterable[str] = (), patterns: Iterable[str | re.Pattern] = ()) -> str:
    """`text` with every verdict-like or control-like sequence broken by an invisible joiner (see module)."""
    if not isinstance(text, str):
        raise TypeError(f"quote_output takes the output as str, got {type(text).__name__}")
    compiled = [p if isinstance(p, re.Pattern) else re.compile(p, re.DOTALL) for p in patterns]
    for p in compiled:
        if p.search("") is not None:
            raise ValueError(f"pattern {p.pattern!r} matches the empty string: no quoting can exclude it")
    words = [w for w in reserved if isinstance(w, str) and len(w) >= 1]
    # Default triggers: one pass (inserting joiners creates none of them).
    text = _break_at(text, (m.start() for m in _DEFAULT.finditer(text)))
    # Reserved strings and patterns: break the first character of each occurrence until none is left. Each
    # round inserts a joiner after the first character of every match; for ordinary patterns (literal text
    # with classes) a round or two suffices. A pattern that can swallow joiners (".*Yes") is not broken by
    # them: after the bound, whatever still matches is replaced outright.
    for _ in range(64):
        cuts: set[int] = set()
        for w in words:
            if len(w) == 1:
                continue  # a one-character string can only be removed, not broken: dropped below
            start = text.find(w)
            while start != -1:
                cuts.add(start)
                start = text.find(w, start + 1)
        for p in compiled:
            for m in p.finditer(text):
                if m.end() > m.start():
                    cuts.add(m.start())
        if not cuts:
            break
        text = _break_at(text, cuts)
    else:
        for p in compiled:
            text = p.sub("[quoted]", text)
    for w in words:
        if len(w) == 1:
            text = text.replace(w, "")
    return text

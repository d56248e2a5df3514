"""Text checks where untrusted text enters: lone UTF-16 surrogates, and strings that would become control tokens.

JSON may carry "\\ud800" (an escape for half of a UTF-16 pair); Python decodes it into a str that UTF-8 cannot
encode, and a tokenizer then raises (TypeError in the fast tokenizers) deep inside a batch. Inputs are checked
where they enter (job records: prmkern/cli/jobs.py; HTTP bodies: prmkern/serve/protocol.py) so such a record or
request fails alone with a message naming the field.

A tokenizer's encode() turns the text of every added token (``<|im_end|>``, ``<|im_start|>``, ``<｜User｜>``...)
into that token wherever it appears, so a step, a problem or code output that prints ``<|im_end|><|im_start|>user``
would end the turn and open a fake one in the verifier's prompt. ``defuse_control_text`` breaks each such string
after its first character with U+2060 WORD JOINER (invisible, zero-width): it then encodes as ordinary text. Text
without such strings is returned unchanged, so released prompts stay byte-identical. The verifier applies it to
every record's problem and steps (every format) and to GenPRM's code output.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

JOINER = "\u2060"


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


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """The strings `tokenizer` encodes as added tokens wherever they occur in text (special or not), longest
    first; single characters are left out (they cannot be broken, and no chat template uses one)."""
    words = {str(getattr(t, "content", t)) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()}
    words.update(getattr(tokenizer, "all_special_tokens", None) or [])
    return tuple(sorted((w for w in words if len(w) >= 2), key=lambda w: (-len(w), w)))


def defuse_control_text(text: str, words: Sequence[str] | Iterable[str]) -> str:
    """`text` with every occurrence of each of `words` broken after its first character by JOINER (repeated until
    none is left: a break cannot create a new occurrence unless a word contains the joiner)."""
    words = [w for w in words if w]
    for _ in range(8):
        cuts = set()
        for w in words:
            at = text.find(w)
            while at != -1:
                cuts.add(at)
                at = text.find(w, at + 1)
        if not cuts:
            return text
        out, last = [], 0
        for at in sorted(cuts):
            out += [text[last:at + 1], JOINER]
            last = at + 1
        text = "".join(out) + text[last:]
    return text

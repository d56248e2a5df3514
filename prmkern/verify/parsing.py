"""Parsing verifier outputs into per-step verdicts, per format (see formats.py).

Each step gets a status: "correct", "incorrect", "missing" (the output never judged it), "malformed" (a verdict
slot holding something else, e.g. ``\\boxed{maybe}``), or "truncated" (the output stops inside the verdict, e.g.
``\\boxed{corr``, or stops before judging a step it had started on). Each judged step also records the character
offset where its verdict word starts, so scoring.py can find the token whose probability decides it.

It does not: read probabilities (scoring.py) or decide what an unjudged step should score (nothing: it is
reported as such).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .formats import VerifierFormat, get_format

__all__ = ["StepVerdict", "ParsedOutput", "parse_output", "STEP_STATUSES"]

STEP_STATUSES = ("correct", "incorrect", "missing", "malformed", "truncated")


@dataclass
class StepVerdict:
    step: int  # 0-based index into the solution's steps
    status: str  # one of STEP_STATUSES
    verdict_text: str | None = None  # what stood in the verdict slot
    char_offset: int | None = None  # where the verdict word starts in the text (chain or paragraph turn)
    chunk: int = 0  # per_paragraph: which turn text holds it (== step); otherwise 0


@dataclass
class ParsedOutput:
    format: str
    steps: list[StepVerdict]
    final: str | None = None  # per_step: "correct" | "incorrect" from the closing question, if present
    earliest_error: int | None = None  # earliest_error formats: the index given (-1: no error); None if none
    answer: str | None = None  # earliest_error formats: the last boxed answer as written (stripped), for the vote
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = dict(Counter(s.status for s in self.steps))


def _verdict_status(fmt: VerifierFormat, word: str) -> str:
    w = word.strip()
    c, i = fmt.correct_text, fmt.incorrect_text
    if not fmt.case_sensitive:
        w, c, i = w.lower(), c.lower(), i.lower()
    return "correct" if w == c else "incorrect" if w == i else "malformed"


def _is_prefix_of_verdict(fmt: VerifierFormat, partial: str) -> bool:
    p = partial.strip() if partial.strip() else partial
    words = (fmt.correct_text, fmt.incorrect_text)
    if not fmt.case_sensitive:
        p, words = p.lower(), tuple(w.lower() for w in words)
    return any(w.startswith(p) for w in words)


def _last_verdict(fmt: VerifierFormat, text: str, start: int, end: int, at_end: bool) -> StepVerdict | None:
    """The last verdict slot in text[start:end]; status set, step left at -1."""
    found = None
    for m in re.finditer(fmt.verdict_regex, text[start:end]):
        closed = m.groupdict().get("close") is not None
        word = m.group("verdict")
        offset = start + m.start("verdict")
        if closed:
            found = StepVerdict(-1, _verdict_status(fmt, word), word, offset)
        elif at_end and start + m.end() == len(text) and _is_prefix_of_verdict(fmt, word):
            found = StepVerdict(-1, "truncated", word, offset)
        else:
            found = StepVerdict(-1, "malformed", word, offset)
    if found is None and at_end:
        # Cut inside the opening of the slot itself ("\\boxe", "$\\boxed"): truncated too.
        tail = text[max(start, len(text) - len(fmt.verdict_prefix) - 20):]
        for k in range(len(fmt.verdict_prefix), 0, -1):
            if tail.endswith(fmt.verdict_prefix[:k]) and k >= 2:
                return StepVerdict(-1, "truncated", "", None)
    return found


def parse_output(fmt: VerifierFormat | str, output: str | Sequence[str | None], num_steps: int, *,
                 finished: bool | Sequence[bool] = True) -> ParsedOutput:
    """Per-step verdicts from one verifier chain.

    output: the generated text (per_step, earliest_error), or for per_paragraph formats the list of assistant
    turns, one per paragraph (None or a missing tail: that paragraph was not verified).
    finished: False when generation stopped at the token limit (a step it had begun is then "truncated");
    per paragraph for per_paragraph formats.
    """
    fmt = get_format(fmt)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if fmt.kind == "per_paragraph":
        return _parse_per_paragraph(fmt, output, num_steps, finished)
    if not isinstance(output, str):
        raise TypeError(f"format {fmt.name!r} parses one text, got {type(output).__name__}")
    if not isinstance(finished, bool):
        raise TypeError(f"finished must be a bool for format {fmt.name!r}, got {type(finished).__name__}")
    if fmt.kind == "earliest_error":
        return _parse_earliest_error(fmt, output, num_steps, finished)
    return _parse_per_step(fmt, output, num_steps, finished)


def _parse_per_step(fmt: VerifierFormat, text: str, n: int, finished: bool) -> ParsedOutput:
    final_m = None
    if fmt.final_regex:
        for final_m in re.finditer(fmt.final_regex, text):
            pass
    body_end = final_m.start() if final_m else len(text)
    headers = [(m.start(), m.end(), int(m.group("step"))) for m in re.finditer(fmt.step_header_regex, text)
               if m.start() < body_end]
    best: dict[int, StepVerdict] = {}
    for j, (_, h_end, k) in enumerate(headers):
        idx = k - fmt.step_base
        if not 0 <= idx < n:
            continue
        sec_end = headers[j + 1][0] if j + 1 < len(headers) else body_end
        at_end = sec_end == len(text)  # this section is where the output stops
        v = _last_verdict(fmt, text, h_end, sec_end, at_end=at_end)
        if v is None:
            if at_end and not finished:
                v = StepVerdict(-1, "truncated")
            else:
                continue
        v.step = idx
        prev = best.get(idx)
        # A later complete verdict for the same step (the verifier revisited it) replaces an earlier one.
        if prev is None or v.status in ("correct", "incorrect") or prev.status not in ("correct", "incorrect"):
            best[idx] = v
    steps = [best.get(i, StepVerdict(i, "missing")) for i in range(n)]
    final = None
    if final_m:
        final = "correct" if final_m.group("verdict").lower() in ("yes", fmt.correct_text.lower()) else "incorrect"
    return ParsedOutput(fmt.name, steps, final=final)


def _parse_per_paragraph(fmt: VerifierFormat, turns: object, n: int, finished: object) -> ParsedOutput:
    if isinstance(turns, str) or not isinstance(turns, Sequence):
        raise TypeError(f"format {fmt.name!r} parses a list of per-paragraph turns, got {type(turns).__name__}")
    if len(turns) > n:
        raise ValueError(f"got {len(turns)} paragraph turns for {n} steps")
    fin = [finished] * len(turns) if isinstance(finished, bool) else list(finished)
    if len(fin) != len(turns):
        raise ValueError(f"finished must be a bool or one per turn ({len(turns)}), got {len(fin)}")
    steps = []
    for i in range(n):
        turn = turns[i] if i < len(turns) else None
        if turn is None:
            steps.append(StepVerdict(i, "missing", chunk=i))
            continue
        if not isinstance(turn, str):
            raise TypeError(f"turn {i} must be a str or None, got {type(turn).__name__}")
        v = _last_verdict(fmt, turn, 0, len(turn), at_end=not fin[i])
        if v is None:
            v = StepVerdict(-1, "truncated" if not fin[i] else "missing")
        v.step, v.chunk = i, i
        steps.append(v)
    return ParsedOutput(fmt.name, steps)


def _parse_earliest_error(fmt: VerifierFormat, text: str, n: int, finished: bool) -> ParsedOutput:
    """ProcessBench's rule: the last match of the answer regex, stripped, then int(); anything else is no answer."""
    matches = list(re.finditer(fmt.index_regex, text))
    if not matches:
        v = _last_verdict(fmt, text, 0, len(text), at_end=not finished)
        status = "truncated" if (v is not None and v.status == "truncated") or (v is None and not finished) \
            else "malformed" if v is not None else "missing"
        return ParsedOutput(fmt.name, [StepVerdict(i, status) for i in range(n)])
    m = matches[-1]
    group = "index" if "index" in m.re.groupindex else 1
    answer = m.group(group).strip()
    offset = m.start(group)
    try:
        idx = int(answer)
    except ValueError:
        return ParsedOutput(fmt.name, [StepVerdict(i, "malformed", answer, offset) for i in range(n)], answer=answer)
    if idx < -1 or idx >= n:
        return ParsedOutput(fmt.name, [StepVerdict(i, "malformed", answer, offset) for i in range(n)],
                            earliest_error=None, answer=answer)
    steps = []
    for i in range(n):
        if idx == -1 or i < idx:
            steps.append(StepVerdict(i, "correct", answer, offset))
        elif i == idx:
            steps.append(StepVerdict(i, "incorrect", answer, offset))
        else:
            steps.append(StepVerdict(i, "missing"))  # after the first error the critic judges nothing
    return ParsedOutput(fmt.name, steps, earliest_error=idx, answer=answer)

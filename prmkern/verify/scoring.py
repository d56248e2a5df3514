"""Verdict probabilities, step scores over K chains, solution scores and the earliest error.

At each verdict, P(correct) = p(c) / (p(c) + p(i)), where c and i are the first tokens of the two verdict words
(formats.VerifierFormat.verdict_token_ids) and p are the engine's log-probabilities for those chosen ids at the
position where the verdict word was generated (exact; no top-k list involved). The position is found from the
parsed verdict's character offset and the generated tokens' character offsets.

Steps whose verdict is missing, malformed or truncated, or whose verdict token cannot be read (it was merged
with neighbouring text into one token, or the log-probabilities were not returned) get no score and are
counted; they are never given a default value. A step's score is the mean over the chains that scored it, with
its coverage (that number over K); the solution score is the min, last, mean or product of the scored steps; the
earliest error is the first scored step below a threshold (-1 if none).

It does not: run the model, parse text (parsing.py) or pick formats (formats.py).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .formats import VerifierFormat, get_format
from .parsing import ParsedOutput

__all__ = ["Generated", "VerdictScore", "ChainScores", "StepScore", "SolutionScores", "token_char_offsets",
           "verdict_probability", "score_chain", "aggregate", "solution_score", "earliest_error", "METHODS"]

METHODS = ("min", "last", "mean", "product")


@dataclass
class Generated:
    """The generated tokens behind a parsed text (one chain, or one GenPRM paragraph turn's last round).

    token_logprobs[j]: {token_id: logprob} for the caller-chosen ids at generated position j (the engine's
    CompletionOutput.token_logprobs). text_start: where the decoded tokens begin in the text that was parsed
    (non-zero when the parsed text has a prefix that was not generated in this call, e.g. a GenPRM turn whose
    earlier rounds and code output precede the final round). offsets: each token's start, relative to
    text_start; computed with the tokenizer when not given."""

    token_ids: Sequence[int]
    token_logprobs: Sequence[Mapping[int, float]] | None
    text_start: int = 0
    offsets: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.token_logprobs is not None and len(self.token_logprobs) != len(self.token_ids):
            raise ValueError(f"token_logprobs has {len(self.token_logprobs)} positions for "
                             f"{len(self.token_ids)} tokens")
        if self.offsets is not None and len(self.offsets) != len(self.token_ids):
            raise ValueError(f"offsets has {len(self.offsets)} entries for {len(self.token_ids)} tokens")


@dataclass
class VerdictScore:
    step: int
    status: str  # the parsed status
    p_correct: float | None  # None: not scored
    source: str  # "logprobs" | "verdict_text" | "none"
    token_index: int | None = None
    note: str | None = None  # why a parsed verdict was not scored


@dataclass
class ChainScores:
    steps: list[VerdictScore]
    parsed: ParsedOutput
    counts: dict[str, int] = field(default_factory=dict)  # parse statuses + "unscored"

    def __post_init__(self) -> None:
        c = Counter(s.status for s in self.steps)
        c["unscored"] = sum(s.p_correct is None for s in self.steps)
        self.counts = dict(c)


@dataclass
class StepScore:
    step: int
    score: float | None  # mean P(correct) over the chains that scored this step
    coverage: float  # n_scored / number of chains
    n_scored: int
    counts: dict[str, int]  # parse statuses of this step across chains


@dataclass
class SolutionScores:
    steps: list[StepScore]
    score: float | None  # by `method` over the scored steps; None when no step was scored
    method: str
    earliest_error: int  # first scored step with score < threshold; -1 if none
    threshold: float
    num_chains: int
    unscored_steps: list[int]  # steps no chain scored
    counts: dict[str, int]  # parse statuses summed over steps and chains, plus "unscored" verdicts


def token_char_offsets(token_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """Character offset of each token's start in tokenizer.decode(token_ids).

    Decodes token by token (grouping tokens that split a UTF-8 character); falls back to decoding every prefix
    when the pieces do not add up to the whole (tokenizers that drop or add spaces at word starts)."""
    ids = list(token_ids)
    offsets, pieces, pending, pos = [], [], [], 0
    for t in ids:
        pending.append(t)
        piece = tokenizer.decode(pending)
        if "\ufffd" in piece and len(pending) < 4:
            continue
        offsets += [pos] * len(pending)
        pieces.append(piece)
        pos += len(piece)
        pending = []
    if pending:
        piece = tokenizer.decode(pending)
        offsets += [pos] * len(pending)
        pieces.append(piece)
    if "".join(pieces) == tokenizer.decode(ids):
        return offsets
    return [len(tokenizer.decode(ids[:j])) for j in range(len(ids))]


def verdict_probability(logprobs: Mapping[int, float], correct_id: int, incorrect_id: int) -> float:
    """p(c) / (p(c) + p(i)) from the two log-probabilities (numerically stable)."""
    if correct_id not in logprobs or incorrect_id not in logprobs:
        raise KeyError(f"log-probabilities for ids {correct_id} and {incorrect_id} are needed, "
                       f"got ids {sorted(logprobs)[:8]}")
    lc, li = float(logprobs[correct_id]), float(logprobs[incorrect_id])
    if lc == -math.inf and li == -math.inf:
        raise ValueError("both verdict tokens have probability 0")
    d = li - lc
    return 1.0 / (1.0 + math.exp(d)) if d < 700 else 0.0


def _locate(offsets: Sequence[int], rel: int) -> int | None:
    """Index of the token whose span contains character rel."""
    lo, hi, best = 0, len(offsets) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if offsets[mid] <= rel:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def score_chain(fmt: VerifierFormat | str, parsed: ParsedOutput,
                generated: Generated | Sequence[Generated | None] | None, *,
                verdict_ids: tuple[int, int] | None = None, tokenizer: Any = None,
                use_verdict_text: bool = False) -> ChainScores:
    """Per-step P(correct) for one parsed chain.

    generated: a Generated for per_step formats; one per paragraph turn (or None) for per_paragraph formats;
    may be None when use_verdict_text is set. verdict_ids: (correct id, incorrect id), or a tokenizer to derive
    them with fmt.verdict_token_ids. use_verdict_text: where no probability can be read, score a parsed
    verdict 1.0 / 0.0 (source "verdict_text"); earliest_error formats always score this way.
    """
    fmt = get_format(fmt)
    if not isinstance(parsed, ParsedOutput):
        raise TypeError(f"parsed must be a ParsedOutput, got {type(parsed).__name__}")
    if fmt.kind == "earliest_error":
        use_verdict_text, generated = True, None
    if verdict_ids is None and generated is not None:
        if tokenizer is None:
            raise ValueError("give verdict_ids=(correct_id, incorrect_id) or a tokenizer")
        verdict_ids = fmt.verdict_token_ids(tokenizer)
    chunks: list[Generated | None]
    if generated is None:
        chunks = []
    elif isinstance(generated, Generated):
        chunks = [generated]
    else:
        chunks = list(generated)
    offsets_cache: dict[int, Sequence[int]] = {}
    out = []
    for v in parsed.steps:
        if v.status not in ("correct", "incorrect"):
            out.append(VerdictScore(v.step, v.status, None, "none", note=f"verdict {v.status}"))
            continue
        p, note, j = None, None, None
        chunk = chunks[v.chunk] if v.chunk < len(chunks) else None
        if chunk is None:
            note = "no generated tokens for this verdict"
        elif chunk.token_logprobs is None:
            note = "no log-probabilities returned"
        elif v.char_offset is None:
            note = "verdict has no position"
        else:
            if v.chunk not in offsets_cache:
                if chunk.offsets is not None:
                    offsets_cache[v.chunk] = chunk.offsets
                elif tokenizer is None:
                    raise ValueError("give Generated.offsets or a tokenizer to locate verdict tokens")
                else:
                    offsets_cache[v.chunk] = token_char_offsets(chunk.token_ids, tokenizer)
            offs = offsets_cache[v.chunk]
            rel = v.char_offset - chunk.text_start
            j = _locate(offs, rel) if rel >= 0 else None
            if j is None:
                note = "verdict lies outside the generated tokens"
            elif offs[j] != rel:
                note = f"verdict word starts inside token {j} (merged with the text before it)"
            elif chunk.token_ids[j] not in verdict_ids:
                note = f"token {chunk.token_ids[j]} at the verdict is neither verdict token {verdict_ids}"
            elif not all(t in chunk.token_logprobs[j] for t in verdict_ids):
                note = f"log-probabilities of {verdict_ids} missing at position {j}"
            else:
                p = verdict_probability(chunk.token_logprobs[j], *verdict_ids)
        if p is not None:
            out.append(VerdictScore(v.step, v.status, p, "logprobs", j))
        elif use_verdict_text:
            out.append(VerdictScore(v.step, v.status, 1.0 if v.status == "correct" else 0.0, "verdict_text",
                                    j, note))
        else:
            out.append(VerdictScore(v.step, v.status, None, "none", j, note))
    return ChainScores(out, parsed)


def solution_score(step_scores: Sequence[float | None], method: str = "min") -> float | None:
    """Combines scored steps (None entries are skipped) by min, last, mean or product."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    xs = [s for s in step_scores if s is not None]
    if not xs:
        return None
    if method == "min":
        return min(xs)
    if method == "last":
        return xs[-1]
    if method == "mean":
        return sum(xs) / len(xs)
    return math.prod(xs)


def earliest_error(step_scores: Sequence[float | None], threshold: float = 0.5) -> int:
    """Index of the first scored step below threshold; -1 if none."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    for i, s in enumerate(step_scores):
        if s is not None and s < threshold:
            return i
    return -1


def aggregate(chains: Sequence[ChainScores], num_steps: int, *, method: str = "min",
              threshold: float = 0.5) -> SolutionScores:
    """Step scores as the mean over the K chains that scored each step; solution score and earliest error."""
    if not chains:
        raise ValueError("aggregate needs at least one chain")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    k = len(chains)
    steps, total = [], Counter()
    for i in range(num_steps):
        vals, counts = [], Counter()
        for ch in chains:
            v = ch.steps[i] if i < len(ch.steps) else None
            if v is None:
                counts["missing"] += 1
                continue
            counts[v.status] += 1
            if v.p_correct is not None:
                vals.append(v.p_correct)
            else:
                total["unscored"] += 1
        total.update(counts)
        steps.append(StepScore(i, sum(vals) / len(vals) if vals else None, len(vals) / k, len(vals), dict(counts)))
    scores = [s.score for s in steps]
    return SolutionScores(steps, solution_score(scores, method), method, earliest_error(scores, threshold),
                          threshold, k, [s.step for s in steps if s.score is None], dict(total))

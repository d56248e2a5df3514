"""Verdict probabilities, step scores over K chains, solution scores and the earliest error.

At each verdict, P(correct) = p(c) / (p(c) + p(i)), where c and i are the first tokens of the two verdict words
(formats.VerifierFormat.verdict_token_ids) and p are the engine's log-probabilities for those chosen ids at the
position where the verdict word was generated (exact; no top-k list involved). The position is found from the
parsed verdict's character offset and the generated tokens' character offsets.

Per format, as released:
* ThinkPRM: the solution score is the forced final verdict, P(yes) / (P(yes) + P(no)) read after "\nIs the solution
  correct? " was appended, averaged over the chains (method "final"); the per-step P(correct) of the chain's
  \boxed{correct}/\boxed{incorrect} verdicts are kept as an addition (step scores, earliest error).
* GenPRM: per paragraph, the first "(Yes|No)}" in the turn decides which token is read; the score is P(Yes) /
  (P(Yes) + P(No)) at that token's last occurrence in the final generation round; no decision scores 0.5
  (`genprm_paragraph_score`). Maj@N: the mean over the N judgements of a paragraph.
* ProcessBench critic: the plurality of the chains' answers (processbench.plurality_vote; method "vote").

Unscored steps (missing, malformed or truncated verdicts, unreadable verdict tokens, failed chains) get no score
and are counted; they are never given a default value (GenPRM's released 0.5 for a turn without a decision is the
one exception, as released). A step's score is the mean over the chains that scored it, with its coverage; the
solution score is the min, last, mean or product of the scored steps, or the final verdict's mean.

The earliest error (one rule for every format): walking the steps in order, the first scored step below the
threshold is the earliest error; a step no chain scored before any such error makes the answer unknown (None):
a solution whose steps were not all judged is never "no error". -1 only when every step was scored and none is
below the threshold.

It does not: run the model, parse text (parsing.py) or pick formats (formats.py).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .formats import VerifierFormat, get_format
from .parsing import ParsedOutput

__all__ = ["Generated", "VerdictScore", "ChainScores", "StepScore", "SolutionScores", "token_char_offsets",
           "verdict_probability", "score_chain", "aggregate", "solution_score", "earliest_error", "METHODS",
           "genprm_paragraph_score"]

METHODS = ("min", "last", "mean", "product", "final", "vote")


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
    final: float | None = None  # ThinkPRM: the forced final verdict's P(yes); None when not read

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
    score: float | None  # by `method` over the scored steps (or the chains' final verdicts); None: nothing scored
    method: str
    earliest_error: int | None  # see the module docstring's rule; None: unknown (a step before any error unscored)
    threshold: float
    num_chains: int
    unscored_steps: list[int]  # steps no chain scored
    counts: dict[str, int]  # parse statuses summed over steps and chains, plus "unscored" verdicts
    final_scores: list[float | None] = field(default_factory=list)  # per chain (ThinkPRM)
    vote: int | None = None  # method "vote": the plurality of the chains' answers
    stopped_at: int | None = None  # stop_at_first_error: judging stopped at this step (later ones not judged)


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
    """Combines scored steps (None entries are skipped) by min, last, mean or product ("final" and "vote" are
    chain-level: aggregate handles them; here they fall back to "min")."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("final", "vote"):
        method = "min"
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


def earliest_error(step_scores: Sequence[float | None], threshold: float = 0.5) -> int | None:
    """Index of the first step below threshold; None when an unscored step (None) comes before any such step;
    -1 when every step is scored and none is below."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    for i, s in enumerate(step_scores):
        if s is None:
            return None
        if s < threshold:
            return i
    return -1


def genprm_paragraph_score(turn_text: str, token_ids: Sequence[int],
                           token_logprobs: Sequence[Mapping[int, float]] | None, yes_id: int, no_id: int,
                           decision_regex: str = r"(Yes|No)\}") -> tuple[float | None, str]:
    """GenPRM's released reward for one paragraph turn: (score, source).

    turn_text: the whole assistant turn (openers, every round, code outputs); token_ids / token_logprobs: the final
    generation round only. The first case-insensitive decision_regex match picks "Yes" or "No"; at that token's
    last occurrence in the round, P(Yes) / (P(Yes) + P(No)) (exact log-probabilities, where the release read a top-20
    list). No decision: 0.5 (source "no_decision"). Decision token absent from the round (the release raises there)
    or no log-probabilities: (None, reason)."""
    m = re.search(decision_regex, turn_text, re.IGNORECASE)
    if m is None:
        return 0.5, "no_decision"
    target = yes_id if m.group(1).capitalize() == "Yes" else no_id
    ids = list(token_ids)
    if target not in ids:
        return None, "decision token not in the final round"
    j = len(ids) - 1 - ids[::-1].index(target)
    if token_logprobs is None or yes_id not in token_logprobs[j] or no_id not in token_logprobs[j]:
        return None, "no log-probabilities at the decision token"
    ly, ln = float(token_logprobs[j][yes_id]), float(token_logprobs[j][no_id])
    if ly == -math.inf and ln == -math.inf:
        return 0.5, "logprobs"  # the release: a zero denominator scores 0.5
    return verdict_probability(token_logprobs[j], yes_id, no_id), "logprobs"


def aggregate(chains: Sequence[ChainScores], num_steps: int, *, method: str = "min",
              threshold: float = 0.5) -> SolutionScores:
    """Step scores as the mean over the K chains that scored each step; solution score and earliest error.

    method "final": the solution score is the mean of the chains' final verdicts (chains without one skipped).
    method "vote": the earliest error is the plurality of the chains' answers (ProcessBench), the solution score the
    min of the step scores."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
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
    finals = [ch.final for ch in chains]
    score = solution_score(scores, method)
    first = earliest_error(scores, threshold)
    vote = None
    if method == "final":
        read = [f for f in finals if f is not None]
        score = sum(read) / len(read) if read else None
    elif method == "vote":
        from .processbench import plurality_vote
        vote = plurality_vote([ch.parsed.answer for ch in chains])
        first = vote if vote is not None and -1 <= vote < num_steps else None
    return SolutionScores(steps, score, method, first, threshold, k, [s.step for s in steps if s.score is None],
                          dict(total), finals, vote)

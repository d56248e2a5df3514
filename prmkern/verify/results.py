"""What a verification produces: its chains (Chain, one Turn per conversation turn), the VerificationResult of a
solution and its JSON row, and the one rule for what a verification record must hold (check_record, check_label).

Plain data: the Verifier (protocols.py) fills them in, the command line and the server write them out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prmkern.textcheck import find_lone_surrogate
from prmkern.verify.scoring import ChainScores, SolutionScores

__all__ = ["Chain", "Turn", "VerificationResult", "check_record", "check_label"]


@dataclass
class Chain:
    """One verification chain. For single-turn formats `turns` has one entry; GenPRM has one per paragraph."""

    turns: list["Turn"] = field(default_factory=list)
    scores: ChainScores | None = None
    forced_rounds: int = 0
    code_runs: list[dict[str, Any]] = field(default_factory=list)
    final: float | None = None  # ThinkPRM: the forced final verdict's P(yes)
    error: str | None = None  # this chain failed (engine error, sandbox failure); the rest of the record goes on


@dataclass
class Turn:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated and appended tokens of this turn
    token_logprobs: list[dict[int, float]] = field(default_factory=list)  # {} at appended (not generated) tokens
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    last_round_start: int = 0  # index in token_ids where the last generation round began
    stop_cut: int | None = None  # character offset in decode(token_ids) where the last round's stop string starts
    done: bool = False
    text: str = ""  # GenPRM: the whole assistant turn as released code keeps it (openers, rounds, code outputs)
    masks: list[tuple[int, int]] = field(default_factory=list)  # GenPRM: spans of `text` that code printed
    score: float | None = None  # GenPRM: this paragraph judgement's score (None: unscored)
    score_source: str | None = None  # GenPRM: how it was scored, or why not


@dataclass
class VerificationResult:
    record_id: Any
    num_steps: int
    scores: SolutionScores | None
    chains: list[Chain]
    error: str | None = None
    scoring: str | None = None  # the VerifyConfig.scoring that produced the scores
    stopped_at: int | None = None  # stop_at_first_error: the step where judging stopped (steps after it not judged)
    chains_run: int | None = None  # adaptive chain count: the chains this solution ran (adaptive.py)
    adaptive_risk: float | None = None  # adaptive chain count: the stopping rule's risk after its last wave

    @property
    def prediction(self) -> int | None:
        """Earliest wrong step (-1: none); None when unknown (see scoring's rule for unscored steps)."""
        if self.scores is None:
            return None
        return self.scores.earliest_error

    def to_json(self, tokenizer: Any, include_chains: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.record_id, "error": self.error, "prediction": self.prediction,
                               "scoring": self.scoring}
        if self.scores is not None:
            s = self.scores
            out.update(step_scores=[st.score for st in s.steps], step_coverage=[st.coverage for st in s.steps],
                       solution_score=s.score, method=s.method, earliest_error=s.earliest_error,
                       threshold=s.threshold, verdict_counts=s.counts, unscored_steps=s.unscored_steps,
                       final_scores=s.final_scores, vote=s.vote)
            if self.stopped_at is not None:
                out["stopped_at"] = self.stopped_at
        if self.chains_run is not None:
            out.update(chains_run=self.chains_run, adaptive_risk=self.adaptive_risk)
        if include_chains:
            out["chains"] = [{"text": [t.text or tokenizer.decode(t.token_ids) for t in c.turns], "error": c.error,
                              "final": c.final,
                              "verdicts": [v.status for v in c.scores.steps] if c.scores else None,
                              "p_correct": [v.p_correct for v in c.scores.steps] if c.scores else None,
                              "finish_reason": c.turns[-1].finish_reason if c.turns else None,
                              "forced_rounds": c.forced_rounds, "code_runs": c.code_runs} for c in self.chains]
        return out


def check_record(rec: Any) -> tuple[str, list[str]]:
    """(problem, steps) of a verification record, or a ValueError naming what it lacks: the one rule for records,
    used by the Verifier and by the command line (before a model loads, with `check_label`)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("problem"), str) or not isinstance(rec.get("steps"), list):
        raise ValueError("a record needs 'problem' (str) and 'steps' (list of str); got keys "
                         f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
    if not rec["steps"] or not all(isinstance(s, str) and s.strip() for s in rec["steps"]):
        raise ValueError("'steps' must be a non-empty list of non-empty strings")
    check_text({"problem": rec["problem"], "steps": rec["steps"]})
    return rec["problem"], rec["steps"]


def check_text(value: Any, where: str = "the text") -> None:
    """ValueError naming where a str (or a record's fields) holds a lone surrogate such as "\ud800", which the
    tokenizer fails on deep inside, taking its whole batch with it; the command line and the server refuse the
    same text (textcheck.find_lone_surrogate)."""
    found = find_lone_surrogate(value)
    if found is not None:
        raise ValueError(f"invalid text: {found[0] or where} holds a lone surrogate {found[1]} (half of a UTF-16 "
                         f"pair); accepted: Unicode text that UTF-8 can encode")


def check_label(rec: dict[str, Any], need_label: bool = False) -> None:
    """A checked record's `label` (the first wrong step, -1 for none): optional unless need_label, checked when
    present. The Verifier does not read labels; evaluations against them do."""
    if "label" not in rec:
        if need_label:
            raise ValueError("a ProcessBench record needs 'label' (the first wrong step, -1 for none)")
        return
    label, steps = rec["label"], rec["steps"]
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
        raise ValueError(f"'label' is {label!r}; accepted: -1 (no error) or a step index in [0, {len(steps)}), "
                         f"or no 'label' at all")

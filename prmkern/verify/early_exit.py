"""Stop at the first error: decide, while a solution's chains are still generating, that its earliest error is
settled, so the rest of its chains can be aborted (their KV blocks freed) and its later steps are not judged.

Step-verdict formats (per_step: thinkprm, prmkern). A chain's verdict on step j is *given* once it has closed a
verdict slot in step j's section (`\\boxed{incorrect}`), opened a later step's section, or ended for good (no
budget-forcing round will continue it). Once every chain has given its verdict on steps 0..j, step j's mean is what a full run computes; when
it is below the threshold, or no chain scored it (the one rule for unscored steps: the prediction is then unknown),
the earliest error is decided and nothing later can change it. The step scores are computed by the Verifier's own
scoring code on the chains' text so far, so both runs score identical tokens identically.

The one case this cannot foresee: a chain that judges a step again after giving its verdict (a second verdict
slot in the same section, or the step's header written again later): the parser keeps the later verdict. The verifiers here judge steps in order; tests compare
stopped runs with full runs on the bundled sets.

GenPRM (per_paragraph) needs no watching: paragraphs are judged one after another (genprm_protocol.py stops after
the first paragraph whose Maj@N score is below the threshold or unscored).

`ChainWatch.__call__(request_index, views)` is what the generate loops call after every engine step; it returns
True when that request should be aborted. A view is one chain as it stands (the engine's Sequence has these
fields): chain_index, num_output_tokens, output_tokens_from(start), token_logprobs, finished, finish_reason.
It knows nothing else of the engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from prmkern.verify.parsing import parse_output
from prmkern.verify.scoring import aggregate

__all__ = ["ChainWatch", "RecordWatch", "stopped_step", "check_applies"]


def check_applies(fmt: Any, method: str) -> None:
    """ValueError when stop_at_first_error cannot apply: methods and formats that need every chain complete."""
    if fmt.kind == "earliest_error":
        raise ValueError(f"stop_at_first_error does not apply to format {fmt.name!r}: its chains name the earliest "
                         f"error only at their end (method 'vote' over whole chains); run it without the flag")
    if method in ("final", "vote"):
        raise ValueError(f"stop_at_first_error does not apply to method {method!r}: it scores whole chains "
                         f"({'the forced final verdict' if method == 'final' else 'a vote over their answers'}); "
                         f"use min, last, mean or product, or run without the flag")


@dataclass
class _ChainState:
    prior_ids: list[int]  # tokens of earlier rounds (budget forcing), continuation included
    prior_lps: list[dict[int, float]]
    ids: list[int] = field(default_factory=list)  # this round's generated tokens
    lps: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # this round's, once it ended
    ended: bool = False  # ended for good: no later forcing round continues it
    forced_rounds: int = 0
    stale: bool = True  # wrote a token that may settle a verdict since `given` was computed
    given: int = 0  # leading steps this chain has given its verdict on


class RecordWatch:
    """One solution's chains while they generate: decides when its earliest error is settled."""

    def __init__(self, verifier: Any, num_steps: int, chains: Sequence[Any] | int):
        """chains: the record's Chain objects (their turns hold the earlier rounds), or K for a first round."""
        self.v = verifier
        self.n = num_steps
        if isinstance(chains, int):
            self.chains = [_ChainState([], []) for _ in range(chains)]
        else:
            self.chains = []
            for ch in chains:
                turn = ch.turns[0] if ch.turns else None
                st = _ChainState(list(turn.token_ids) if turn else [], list(turn.token_logprobs) if turn else [],
                                 forced_rounds=ch.forced_rounds)
                # a chain that is not in this round (finished earlier, failed) has ended for good
                st.ended, st.finish_reason = True, turn.finish_reason if turn else "error"
                if ch.error is not None:
                    st.finish_reason = "error"
                self.chains.append(st)
        self.scored = 0  # steps every chain had given a verdict on when the scores were last computed
        self.decided: int | None = None  # the step where judging stopped (its error or its unscored step)
        self.undecidable = False  # decided: the prediction is None (a step no chain scored)
        self.dirty = False

    def reopen(self, k: int) -> None:
        """Chain k takes part in this round (a budget-forcing round continues it)."""
        st = self.chains[k]
        st.ended, st.finish_reason, st.ids, st.lps, st.stale = False, None, [], [], True

    def update(self, k: int, view: Any) -> None:
        st = self.chains[k]
        if st.ended:
            return
        n_old, n_now = len(st.ids), view.num_output_tokens
        if n_now > n_old:
            new = view.output_tokens_from(n_old)
            st.ids.extend(new)
            lps = view.token_logprobs
            st.lps.extend(lps[n_old:n_now] if lps else [{} for _ in new])
            if any(self.v._may_settle(t) for t in new):
                self.dirty = st.stale = True
        if view.finished:
            st.finish_reason = view.finish_reason
            st.ended = not self._will_be_forced(st)
            self.dirty = st.stale = True

    def _will_be_forced(self, st: _ChainState) -> bool:
        c = self.v.config
        if c.budget_tokens is None or st.forced_rounds >= c.max_forcing_rounds:
            return False
        n = len(st.prior_ids) + len(st.ids)
        return st.finish_reason == "stop" and n < c.budget_tokens and n + 8 < c.max_tokens

    def check(self) -> bool:
        """True when the earliest error is settled (sets `decided`). Re-reads only the chains that wrote a token that
        may settle a verdict; scores (the costly part) only when every chain has given a verdict on a new step."""
        if self.decided is not None:
            return True
        if not self.dirty:
            return False
        self.dirty = False
        for st in self.chains:
            if st.stale:
                st.stale = False
                if st.ended:
                    st.given = self.n
                else:
                    text = self.v.tok.decode(st.prior_ids + st.ids)
                    st.given = self._given(text, parse_output(self.v.fmt, text, self.n, finished=False))
        frontier = min(st.given for st in self.chains)
        if frontier <= self.scored:
            return False
        self.scored = frontier
        scores = []
        for st in self.chains:
            ids, lps = st.prior_ids + st.ids, st.prior_lps + st.lps
            finished = st.ended and st.finish_reason not in ("length", "error")
            scores.append(self.v.chain_scores(self.v.tok.decode(ids), ids, lps, self.n, finished,
                                              failed=st.finish_reason == "error"))
        agg = aggregate(scores, self.n, method="min", threshold=self.v.config.threshold)
        for j in range(frontier):
            s = agg.steps[j].score
            if s is None or s < self.v.config.threshold:
                self.decided, self.undecidable = j, s is None
                return True
        return False

    def _given(self, text: str, parsed: Any) -> int:
        """How many leading steps an unfinished chain has given its verdict on: the steps before its open section
        (the last step header), and the open one too once a verdict slot in it is closed."""
        fmt = self.v.fmt
        end = len(text)
        if fmt.final_regex:
            m = None
            for m in re.finditer(fmt.final_regex, text):
                pass
            if m is not None:
                end = m.start()
        last = None
        for m in re.finditer(fmt.step_header_regex, text[:end]):
            last = int(m.group("step")) - fmt.step_base
        if last is None:
            return 0
        if not 0 <= last < self.n:
            return max(0, min(last, self.n))
        return last + (parsed.steps[last].status in ("correct", "incorrect", "malformed"))


class ChainWatch:
    """The watch over one generate call: request i carries either all chains of record r (n=K, `chain=None`) or
    chain k of record r (a forcing round). Returns True for a request whose record is decided."""

    def __init__(self) -> None:
        self.targets: list[tuple[RecordWatch, int | None]] = []

    def add(self, record: RecordWatch, chain: int | None = None) -> None:
        self.targets.append((record, chain))

    def __call__(self, i: int, views: Sequence[Any]) -> bool:
        record, chain = self.targets[i]
        if record.decided is None:
            for view in views:
                k = view.chain_index if chain is None else chain
                record.update(k, view)
        return record.check()


def stopped_step(scores: Any, decided: int, threshold: float) -> Any:
    """The SolutionScores of a solution whose judging stopped at step `decided`: later steps are not judged (their
    scores, coverage and counts cleared), the solution score covers the judged steps; the earliest error is
    unchanged by construction (`decided` is below the threshold, or unscored)."""
    from prmkern.verify.scoring import StepScore, earliest_error, solution_score
    steps = [s if s.step <= decided else StepScore(s.step, None, 0.0, 0, {"not_judged": scores.num_chains})
             for s in scores.steps]
    values = [s.score for s in steps]
    scores.steps = steps
    scores.score = solution_score(values[:decided + 1], scores.method)
    scores.earliest_error = earliest_error(values, threshold)
    scores.unscored_steps = [s.step for s in steps[:decided + 1] if s.score is None]
    scores.stopped_at = decided
    return scores

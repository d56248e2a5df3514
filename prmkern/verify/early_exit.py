"""Stop at the first error: decide, while a solution's chains are still generating, that its earliest error is
settled, so the rest of its chains can be aborted (their KV blocks freed) and its later steps are not judged.

Step-verdict formats (per_step: thinkprm, prmkern). A chain's verdict on step j is *given* once it has closed a
verdict slot in step j's section (`\\boxed{incorrect}`), opened a later step's section, or ended for good (no
budget-forcing round will continue it); a given verdict is scored by the Verifier's own scoring code on the chain's
text and tokens so far, so both runs score identical tokens identically. A step's score is the mean over the chains
that scored it, so while u chains have not given their verdict on it, the full run's mean is bounded: each of them
adds a P in [0, 1] or nothing (RecordWatch._decide). Walking the steps in order, the earliest error is decided as
soon as the bounds settle it: every earlier step's low bound at or above the threshold, and this step's high bound
below it, or no chain scored it with none left to (the one rule for unscored steps: the prediction is then
unknown); or every step's low bound at or above the threshold ("no error": the chains' closing lines are not
waited for). Nothing later can change a settled answer, so the solution's remaining chains are aborted.

The one case this cannot foresee: a chain that judges a step again after giving its verdict (a second verdict
slot in the same section, or the step's header written again later): the parser keeps the later verdict. The
verifiers here judge steps in order; tests compare stopped runs with full runs on the bundled sets.

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
from typing import Any, Callable, Sequence

from prmkern.verify.parsing import parse_output

_MARGIN = 1e-9  # bounds with chains still to give a verdict clear the threshold by this much

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
    values: list[float | None] | None = None  # its P(correct) on those steps (None: unscored)


class RecordWatch:
    """One solution's chains while they generate: decides when its earliest error is settled."""

    def __init__(self, verifier: Any, num_steps: int, chains: Sequence[Any] | int,
                 on_event: Callable[[dict[str, Any]], None] | None = None, stop: bool = True, key: Any = None):
        """chains: the record's Chain objects (their turns hold the earlier rounds), or K for a first round.
        on_event: streamed verdicts (`step_event`, `decided_event`); stop: abort the chains once decided (False:
        watch only, for the events). key: the record's key; once it is in the verifier's `drop_keys` (a search
        pruning it, streaming.py) and the record is decided, its chains are aborted as `stop` would (`dropped`)."""
        self.v = verifier
        self.key = key
        self.dropped = False
        self.on_event, self.stop = on_event, stop
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
        self.decided: int | None = None  # the step where judging stopped (its error or its unscored step)
        self.undecidable = False  # decided: the prediction is None (a step no chain scored)
        self.no_error = False  # decided: every step settled at or above the threshold (decided = n - 1)
        self.dirty = False

    def reopen(self, k: int) -> None:
        """Chain k takes part in this round (a budget-forcing round continues it)."""
        st = self.chains[k]
        st.ended, st.finish_reason, st.ids, st.lps, st.stale = False, None, [], [], True
        st.given, st.values = 0, None

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
        may settle a verdict; scores a chain (the costly part) only when it has given a verdict on a new step."""
        if self.decided is not None and self._drop_asked():
            self.dropped = True
            return True
        if self.decided is not None and (self.stop or self.on_event is None):
            return self.stop
        if not self.dirty:
            return False
        self.dirty = False
        changed: set[int] = set()
        for st in self.chains:
            if not st.stale:
                continue
            st.stale = False
            if st.ended:
                given = self.n
            else:
                text = self.v.tok.decode(st.prior_ids + st.ids)
                given = self._given(text, parse_output(self.v.fmt, text, self.n, finished=False))
            if given > st.given or (st.ended and st.values is None):
                st.given = given
                ids, lps = st.prior_ids + st.ids, st.prior_lps + st.lps
                finished = st.ended and st.finish_reason not in ("length", "error")
                sc = self.v.chain_scores(self.v.tok.decode(ids), ids, lps, self.n, finished,
                                         failed=st.finish_reason == "error")
                changed.update(range(len(st.values or ()), given))
                st.values = [v.p_correct for v in sc.steps[:given]]
        if not changed:
            return False
        if self.on_event is not None:
            for j in sorted(changed):
                self.on_event(self.step_event(j))
        if self.decided is not None:  # watched only (stop=False): decided earlier, the events go on
            return False
        decided = self._decide()
        if decided and self.on_event is not None:
            self.on_event({"type": "decided", "earliest_error": None if self.undecidable else
                           -1 if self.no_error else self.decided, "chains_given": self._given_counts()})
        if decided and self._drop_asked():
            self.dropped = True
            return True
        return decided and self.stop

    def _drop_asked(self) -> bool:
        keys = getattr(self.v, "drop_keys", None)
        return bool(keys) and self.key is not None and self.key in keys

    @property
    def halted(self) -> bool:
        """Its chains were aborted once decided: stop_at_first_error, or a search dropped it."""
        return self.decided is not None and (self.stop or self.dropped)

    def _given_counts(self) -> list[int]:
        return [st.given for st in self.chains]

    def _step(self, j: int) -> tuple[list[float], int, int, str | None]:
        """Step j as it stands: (scored values, chains that gave it, chains still to give it, settled state:
        "correct" / "error" / "unscored" once the bounds (see _decide) settle it, else None)."""
        thr = self.v.config.threshold
        given = [st.values[j] for st in self.chains if st.given > j]
        u = len(self.chains) - len(given)
        vals = [x for x in given if x is not None]
        if not vals:
            return vals, len(given), u, None if u else "unscored"
        s, m = sum(vals), len(vals)
        if u == 0:
            return vals, len(given), u, "error" if s / m < thr else "correct"
        if (s + u) / (m + u) < thr - _MARGIN:
            return vals, len(given), u, "error"
        if s / (m + u) >= thr + _MARGIN:
            return vals, len(given), u, "correct"
        return vals, len(given), u, None

    def step_event(self, j: int) -> dict[str, Any]:
        """A streamed verdict event: step j's per-chain P(correct) (None: unscored; "pending": not given yet), the
        running mean over the chains that scored it, and whether the bounds settle it."""
        vals, _, u, settled = self._step(j)
        return {"type": "step", "step": j,
                "p_correct": [st.values[j] if st.given > j else "pending" for st in self.chains],
                "mean": sum(vals) / len(vals) if vals else None, "pending": u, "settled": settled}

    def _decide(self) -> bool:
        """Walks the steps in order with bounds on each step's mean: a chain that has not given its verdict on step
        i yet will either score it with some P in [0, 1] or leave it unscored (a step's score is the mean over the
        chains that scored it), so with sum s over m scoring chains and u chains still to give it, the mean a full
        run computes lies in [s / (m + u), (s + u) / (m + u)]. Step i is settled at or above the threshold when the
        low bound is, below it when the high bound is (that step is the earliest error), and unscored when no chain
        scored it and none is left to (the one rule: the prediction is unknown). When every step is settled at or
        above, the answer is "no error". Where u > 0 the bounds must clear the threshold by a margin far above
        float rounding; where u = 0 the mean is computed exactly as scoring.aggregate computes it."""
        for j in range(self.n):
            settled = self._step(j)[3]
            if settled is None:
                return False
            if settled != "correct":
                self.decided, self.undecidable = j, settled == "unscored"
                return True
        self.decided, self.no_error = self.n - 1, True
        return True

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
        self.targets: list[tuple[RecordWatch, int | None, int]] = []

    def add(self, record: RecordWatch, chain: int | None = None, first: int = 0) -> None:
        """chain: the one chain of `record` this request continues; else the request carries the record's chains
        first, first + 1, ... (a wave: SamplingParams.first_chain)."""
        self.targets.append((record, chain, first))

    def __call__(self, i: int, views: Sequence[Any]) -> bool:
        record, chain, first = self.targets[i]
        # watched only (streamed verdicts, not dropped): read on after deciding
        if record.decided is None or not (record.stop or record.dropped):
            for view in views:
                k = first + view.chain_index if chain is None else chain
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

"""Forkable verification sessions: verify a solution step by step while a search writes it.

    session = verifier.open(problem)       # nothing runs yet
    v = session.add_step("2 plus 3 is 5.")  # StepVerdicts: per-chain verdicts and P(correct) of the new step
    child = session.fork()                  # shares everything written so far; pays only for its own steps
    session.close()                         # drops its pins (and its code sandboxes)

A session keeps its chains' state (text and token ids) and pins the KV blocks of its conversations in the prefix
cache (BlockManager.pin), so the next step prefills only what is new. A fork copies the Python state and takes its
own pins on the same physical blocks (blocks are immutable once full: copy-on-write comes from the prefix cache).
The manager bounds the sessions that hold pins (`SessionLimits.max_sessions`) and the blocks they pin
(`max_pinned_blocks`, default half the pool): past either, the least recently used sessions are unpinned. An
evicted session stays valid and gives the same results; its next step recomputes what the cache lost.

How a step is appended depends on the format kind (session_steps.py: one state class per kind;
docs/verifiers.md#sessions states what differs from verify()):
* per_paragraph (GenPRM): the conversation gains the paragraph's user turn; each judgement runs as in verify() with
  the same seeds, so a session equals a whole-solution run of the same record index exactly. Code runs in the
  session's own sandbox sessions; a fork gets fresh ones into which its chains' earlier snippets are replayed.
* discriminative (qwen-prm): the prompt gains the step and its separator; only the new separator is pooled (the
  earlier rows are kept), the rest of the prompt comes from the cache.
* per_step (ThinkPRM, prmkern): round k renders the prompt with steps 1..k; each chain's text is carried verbatim
  up to where it would start judging step k, "Step k:" is appended and the chain continues until "Step k+1:", the
  opening of its final verdict ("Is the solution correct?") or its format's stops. Nothing is generated twice; the
  carried text is prefilled again because the solution sits in the prompt before the chain. The first step equals
  verify() on the one-step solution exactly.
Thread safety: the manager's pin bookkeeping is guarded by a lock, so sessions of one manager may add steps from
several threads at once (the server's /v1/sessions, prmkern/serve/sessions_api.py); one session's own calls must not
overlap. A session may carry its own Verifier (`open(..., verifier=)`: other format settings, one manager and one set
of limits).
This file holds the session objects, their pins and limits; it does not append steps (session_steps.py), search
(prmkern/verify/search.py) or serve sessions over HTTP (prmkern/serve/sessions_api.py).
"""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prmkern.textcheck import defuse_control_text
from prmkern.verify.results import check_text
from prmkern.verify.scoring import SolutionScores
from prmkern.verify.session_steps import STATES


@dataclass
class SessionLimits:
    max_sessions: int = 256  # sessions holding pinned KV; past it the least recently used is unpinned
    max_pinned_blocks: int | None = None  # distinct blocks pinned by all sessions; None: half the KV pool

    def __post_init__(self) -> None:
        if not isinstance(self.max_sessions, int) or self.max_sessions < 1:
            raise ValueError(f"max_sessions={self.max_sessions!r} is invalid; accepted: an int >= 1")
        if self.max_pinned_blocks is not None and (not isinstance(self.max_pinned_blocks, int)
                                                   or self.max_pinned_blocks < 0):
            raise ValueError(f"max_pinned_blocks={self.max_pinned_blocks!r} is invalid; accepted: None or an int >= 0")


@dataclass
class StepVerdicts:
    step: int  # 0-based index of the step just added
    score: float | None  # mean P(correct) over the chains that scored it (None: no chain did)
    p_correct: list[float | None]  # per chain
    verdicts: list[str]  # per chain: the parse status of its verdict for this step
    solution: SolutionScores | None  # the solution so far: step scores, solution score, earliest error
    # add_steps: why this session's step failed alone (its verifier prompt past the context); the session is then
    # closed with this reason in VerifySession.error. add_step raises it instead.
    error: str | None = None


class SessionClosed(RuntimeError):
    pass


class SessionManager:
    """The sessions of one Verifier: their pins on the engine's block manager and the limits over them."""

    def __init__(self, verifier: Any, limits: SessionLimits | None = None, block_manager: Any = None):
        """block_manager: what pins blocks (pin, pin_blocks, unpin, num_blocks), default the verifier's engine's; the
        server passes one that runs them on its engine loop's thread (pin_many: several lists in one call)."""
        self.verifier = verifier
        self.limits = limits or SessionLimits()
        engine = getattr(getattr(verifier, "llm", None), "engine", None)
        # None (e.g. tensor parallel): sessions run unpinned
        self.bm = block_manager if block_manager is not None else getattr(engine, "block_manager", None)
        if self.limits.max_pinned_blocks is None and self.bm is not None:
            self.limits.max_pinned_blocks = self.bm.num_blocks // 2
        self.pinned: OrderedDict[int, VerifySession] = OrderedDict()  # least recently used first
        self.evictions = 0
        self._next_id = 0
        self._lock = threading.RLock()  # guards pinned, _next_id, evictions (steps of several sessions may overlap)

    def open(self, problem: str, index: int = 0, verifier: Any = None) -> "VerifySession":
        """verifier: the session's own Verifier (default this manager's); it must run on the same engine."""
        v = verifier if verifier is not None else self.verifier
        if not isinstance(problem, str) or not problem:
            raise ValueError(f"problem must be a non-empty str, got {type(problem).__name__}")
        check_text(problem, "problem")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index={index!r} is invalid; accepted: an int >= 0 (the record index whose seeds the "
                             f"session uses)")
        kind = v.fmt.kind
        state = STATES.get(kind)
        if state is None:
            raise ValueError(f"format {v.fmt.name!r} ({kind}) has no sessions: it names one earliest "
                             f"error per whole solution; accepted kinds: per_step, per_paragraph, discriminative")
        if kind == "per_step" and v.config.budget_tokens is not None:
            raise ValueError("budget forcing (budget_tokens) is not applied in sessions; use budget_tokens=None")
        if getattr(v.config, "chains_min", None) is not None:  # a session's own verifier (the server's) included
            raise ValueError(f"verification sessions run a fixed num_chains; chains_min={v.config.chains_min} (the "
                             f"adaptive chain count) does not apply to them; accepted: a VerifyConfig without "
                             f"chains_min")
        if v.config.stop_at_first_error:
            raise ValueError("stop_at_first_error does not apply to sessions: the caller adds (or stops adding) "
                             "steps; use stop_at_first_error=False (search prunes with best_of_n(prune=True))")
        # The same rule as verify(): a problem's or step's text cannot become chat control tokens.
        problem = defuse_control_text(problem, v.control_words)
        return VerifySession(self, problem, index, state(v, index), v)

    def add_steps(self, items: list[tuple["VerifySession", str]]) -> list[StepVerdicts]:
        """Adds one step to each of several sessions in shared engine batches (a search's siblings at one depth);
        the same results as calling add_step on each in turn. A session whose own step fails in the engine (its
        verifier prompt past the context) fails alone: it is closed, its reason is in its verdict's `error` and in
        `session.error`, and the others' steps are added. A batch that fails as a whole closes its sessions."""
        if not items:
            return []
        v = items[0][0].verifier
        for session, text in items:
            if session.closed:
                raise SessionClosed("a session in this batch is closed")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"a step must be a non-empty str, got {text!r}")
            check_text(text, "the step")  # refused before the session changes: it stays open
            if session.manager is not self:
                raise ValueError("every session of a batch must come from this verifier")
            if session.verifier is not v:
                raise ValueError("every session of a batch must share one Verifier (one format and its settings)")
            check = getattr(type(session.state), "check_step", None)
            if check is not None:  # refused before the session changes (a refused step leaves it open)
                check(v, text)
        if len({id(s) for s, _ in items}) != len(items):
            raise ValueError("a session appears twice in one batch; add its steps one batch after the other")
        for session, text in items:
            session.steps.append(defuse_control_text(text, v.control_words))
        try:
            outcomes = type(items[0][0].state).run_batch(v, [(s.state, s.problem, s.steps, s.sid)
                                                             for s, _ in items])
        except BaseException:  # their chains may be half extended: these sessions end here
            for session, _ in items:
                session.close()
            raise
        out = []
        for (session, _), (scores, pins, error) in zip(items, outcomes):
            k = len(session.steps) - 1
            if error is not None:  # its chains may be half extended: this session ends here
                session.error = error
                session.close()
                out.append(StepVerdicts(k, None, [], [], session.scores, error=error))
                continue
            session.scores = scores
            self._repin(session, pins)
            per = [ch.steps[k] if k < len(ch.steps) else None for ch in session.state.chain_scores()]
            out.append(StepVerdicts(k, scores.steps[k].score, [x.p_correct if x else None for x in per],
                                    [x.status if x else "missing" for x in per], scores))
        return out

    @property
    def pinned_blocks(self) -> int:
        with self._lock:
            return len({b for s in self.pinned.values() for ids in s._pins for b in ids})

    def _take_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def _repin(self, session: "VerifySession", token_lists: list[list[int]]) -> None:
        with self._lock:
            self._unpin(session)
            if self.bm is None or session.closed:
                return
            pin_many = getattr(self.bm, "pin_many", None)
            session._pins = pin_many(token_lists) if pin_many else [self.bm.pin(ids) for ids in token_lists]
            session.evicted = False
            self.pinned[session.sid] = session
            self._enforce(session)

    def _share(self, parent: "VerifySession", child: "VerifySession") -> None:
        """The child of a fork takes its own references on its parent's pinned blocks. A fork is a use of the
        parent: it becomes the most recently used but for its child (the root of many forks is not evicted first)."""
        with self._lock:
            if self.bm is None or parent.sid not in self.pinned:
                return
            self.pinned.move_to_end(parent.sid)
            child._pins = [list(ids) for ids in parent._pins]
            for ids in child._pins:
                self.bm.pin_blocks(ids)
            self.pinned[child.sid] = child
            self._enforce(child)

    def _enforce(self, session: "VerifySession") -> None:
        """Unpins the least recently used sessions (never `session`, unless it alone exceeds the block budget).
        Caller holds _lock."""
        lim = self.limits
        while len(self.pinned) > 1 and (len(self.pinned) > lim.max_sessions
                                        or self.pinned_blocks > lim.max_pinned_blocks):
            victim = next(iter(self.pinned.values()))
            if victim is session:
                break
            self._unpin(victim)
            victim.evicted = True
            self.evictions += 1
        if self.pinned_blocks > lim.max_pinned_blocks:  # this session alone exceeds the budget
            self._unpin(session)
            session.evicted = True
            self.evictions += 1

    def _unpin(self, session: "VerifySession") -> None:
        with self._lock:
            if self.pinned.pop(session.sid, None) is not None and self.bm is not None:
                for ids in session._pins:
                    self.bm.unpin(ids)
            session._pins = []


class VerifySession:
    def __init__(self, manager: SessionManager, problem: str, index: int, state: Any, verifier: Any = None):
        self.manager = manager
        self.verifier = verifier if verifier is not None else manager.verifier  # its format and settings
        self.sid = manager._take_id()
        self.problem = problem
        self.index = index  # the record index whose seeds the session uses (as verify() would at that index)
        self.steps: list[str] = []
        self.state = state
        self.scores: SolutionScores | None = None
        self.evicted = False  # its pins were dropped by the manager's limits (results are unaffected)
        self.closed = False
        self.error: str | None = None  # why a step failed (add_steps; the session was closed)
        self._pins: list[list[int]] = []

    def add_step(self, text: str) -> StepVerdicts:
        """Verifies the new step (the chains already written are extended, not regenerated). A step that fails
        (an engine error, a verifier prompt past the context) closes the session and raises RuntimeError."""
        verdict = self.manager.add_steps([(self, text)])[0]
        if verdict.error is not None:
            raise RuntimeError(verdict.error)
        return verdict

    def fork(self) -> "VerifySession":
        """A session that shares everything written so far (its own pins on the same blocks)."""
        if self.closed:
            raise SessionClosed("this session is closed")
        child = VerifySession(self.manager, self.problem, self.index, self.state.fork(), self.verifier)
        child.steps = list(self.steps)
        child.scores = copy.deepcopy(self.scores)
        self.manager._share(self, child)
        return child

    def result(self) -> Any:
        """The steps so far as verify() reports a record (a VerificationResult); after a failed step, as verify()
        reports a record that failed: no scores, the reason in `error`."""
        from prmkern.verify.protocols import VerificationResult
        return VerificationResult(self.index, len(self.steps), None if self.error else self.scores,
                                  self.state.chains(), error=self.error, scoring=self.verifier.config.scoring)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.manager._unpin(self)
            self.state.close()

    def __enter__(self) -> "VerifySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

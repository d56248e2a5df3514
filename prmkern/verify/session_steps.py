"""How a verification session appends a step, one state class per format kind (sessions.py holds the sessions).

Each class keeps one session's chains (text, token ids, scores) and has `run_batch(verifier, items)`: items are
(state, problem, steps, key) of several sessions that each gained one step; it runs their new step in shared engine
rounds (the protocol coroutines of protocols.py / genprm_protocol.py / discriminative.py, driven by
continuous.run_rounds) and returns per item (SolutionScores so far, the token lists whose KV the session pins, None),
or (None, [], why) when that item's step failed alone (its verifier prompt past the context): the other items'
steps are complete all the same, and sessions.py closes the failed one.
`fork()` copies a state for a child session; `close()` frees what it holds (GenPRM's code sandboxes).
It does not pin blocks, enforce limits or defuse control text (sessions.py does).
"""
from __future__ import annotations

import copy
import re
from typing import Any

from prmkern.pooling import PoolingParams
from prmkern.verify.continuous import run_rounds
from prmkern.verify.scoring import aggregate

class DiscriminativeState:
    """qwen-prm: the prompt gains the step and its separator; only the new separator is pooled."""

    def __init__(self, v: Any, index: int):
        self.v, self.index = v, index
        self.rewards: list[float] = []
        self.prompt: list[int] = []
        self.last_sep = -1  # position of the last pooled separator in self.prompt

    @staticmethod
    def check_step(v: Any, text: str) -> None:
        """A step holding the separator would score as two: refused before the session changes."""
        sep = v.fmt.step_template.replace("{text}", "")
        if sep in text:
            raise ValueError(f"a step contains the step separator {sep!r}; accepted: a step without it")

    @staticmethod
    def run_batch(v: Any, items: list) -> list:
        """items: (state, problem, steps, key); one reward call for all: only each new separator is pooled."""
        from prmkern.verify.discriminative import step_chain
        prompts, params = [], []
        for state, problem, steps, _ in items:
            DiscriminativeState.check_step(v, steps[-1])
            prompt = v.encode(v.fmt.render(problem, steps, v.tok))
            same = prompt[:state.last_sep + 1] == state.prompt[:state.last_sep + 1]
            prompts.append(prompt)
            params.append(PoolingParams(first_position=state.last_sep + 1 if same else 0))
        outcomes = []
        for (state, _, steps, _), prompt, pp, out in zip(items, prompts, params,
                                                         v.llm.reward(prompts, params, use_tqdm=False)):
            if out.error is not None:  # this session alone fails (a prompt past the context)
                outcomes.append((None, [], f"step {len(steps)}: {out.error}"))
                continue
            rewards = (state.rewards if pp.first_position else []) + out.outputs.data[:, 1].tolist()
            if len(rewards) != len(steps):
                raise RuntimeError(f"{len(rewards)} step separators for {len(steps)} steps")
            state.rewards, state.prompt, state.last_sep = rewards, prompt, out.pooled_positions[-1]
            state.scores = step_chain(rewards, v.config.threshold, v.fmt.name)
            outcomes.append((aggregate([state.scores], len(steps), method=v.config.method,
                                       threshold=v.config.threshold), [prompt], None))
        return outcomes

    def chain_scores(self):
        return [self.scores]

    def chains(self):
        from prmkern.verify.protocols import Chain
        return [Chain(scores=self.scores)]

    def fork(self):
        return copy.copy(self)  # its lists are replaced, never mutated

    def close(self) -> None:
        pass


class ParagraphState:
    """GenPRM: the conversation gains the paragraph's user turn; judged as verify() judges it (same seeds)."""

    def __init__(self, v: Any, index: int, runner: Any = None, replay: dict | None = None):
        from prmkern.verify.protocols import VerificationResult
        self.v, self.index = v, index
        self.result = VerificationResult(index, 0, None, [])
        self.history: list[str] = []  # the conversation's assistant turns (judgement 0 of each paragraph)
        self.pool = None
        self.runner = runner or v.config.code_runner
        if self.runner is None:
            from prmkern.sandbox import SessionPool
            self.pool = SessionPool(v.config.code_limits)
            self.runner = _ReplayRunner(self.pool.run_many, replay or {})

    @staticmethod
    def run_batch(v: Any, items: list) -> list:
        """items: (state, problem, steps, key); the new paragraph of every session in shared engine rounds (keys
        keep their chains and sandbox namespaces apart; each session keeps its own record index's seeds)."""
        from prmkern.verify.genprm_protocol import run_paragraphs
        states = {key: state for state, _, _, key in items}
        results, history = {}, {}
        for state, _, steps, key in items:
            state.result.num_steps = len(steps)
            results[key], history[key] = state.result, state.history

        def owner(key: Any) -> Any:  # exact: (session key, chain); released: the session key (one namespace)
            return key[0] if isinstance(key, tuple) else key

        def runner(snippets: list) -> list:  # each session's own sandbox sessions
            out = [None] * len(snippets)
            for key in dict.fromkeys(owner(k) for k, _ in snippets):
                mine = [(j, item) for j, item in enumerate(snippets) if owner(item[0]) == key]
                for (j, _), r in zip(mine, states[key].runner([item for _, item in mine])):
                    out[j] = r
            return out
        run_rounds(v.llm, run_paragraphs(v, [(key, problem, steps) for _, problem, steps, key in items], results,
                                         history=history, start={key: len(steps) - 1 for _, _, steps, key in items},
                                         runner=runner, seed_index={key: state.index for state, _, _, key in items}))
        outcomes = []
        for state, problem, steps, key in items:
            res = state.result
            if res.error is not None:  # this session alone fails (run_paragraphs records it per key)
                outcomes.append((None, [], res.error))
                continue
            # The conversation the next paragraph extends: the last prompt and judgement 0's turn.
            text = v.fmt.render(problem, steps, v.tok, paragraph=len(steps) - 1, history=state.history[:-1])
            opener = v.fmt.prefix(len(steps) - 1)
            convo = (text[:len(text) - len(opener)] if opener else text) + state.history[-1]
            outcomes.append((res.scores, [v.encode(convo)], None))
        return outcomes

    def chain_scores(self):
        return [ch.scores for ch in self.result.chains]

    def chains(self):
        return self.result.chains

    def fork(self):
        # The child's snippets run under its own session key: its sandbox sessions are new, and each replays the
        # snippets its chain ran so far (by chain index; the key's first part is whatever the child is called).
        runs = [(r.get("paragraph", 0), k, n, r) for k, ch in enumerate(self.result.chains)
                for n, r in enumerate(ch.code_runs) if r.get("status") != "exception"]
        replay: dict = {k: [r["code"] for _, kk, _, r in sorted(runs, key=lambda x: x[:3]) if kk == k]
                        for k in range(len(self.result.chains))}
        replay["all"] = [r["code"] for *_, r in sorted(runs, key=lambda x: x[:3])]  # released: one namespace
        child = ParagraphState(self.v, self.index, runner=None if self.pool is not None else self.runner,
                            replay=replay)
        child.result = copy.deepcopy(self.result)
        child.history = list(self.history)
        return child

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close_all()
            self.pool = None


class _ReplayRunner:
    """A code runner whose first snippet for a key is preceded by that key's earlier snippets (a fork's fresh
    sandbox session gets the namespace its parent had built; their outputs are discarded)."""

    def __init__(self, run_many: Any, replay: dict):
        self.run_many, self.replay = run_many, dict(replay)

    def __call__(self, items: list) -> list:
        for key, _ in items:  # exact: (session key, chain index); released: the session key, one namespace
            for code in self.replay.pop(key[1] if isinstance(key, tuple) else "all", []):
                self.run_many([(key, code)])
        return self.run_many(items)


class PerStepState:
    """ThinkPRM / prmkern: each chain is carried verbatim and continues with \"Step k:\"."""

    def __init__(self, v: Any, index: int):
        self.v, self.index = v, index
        self.bodies: list[Any] = []  # per chain: the Turn without the final question
        self.result_chains: list[Any] = []
        self.prompt: list[int] = []

    def _header(self, k: int) -> str:
        """The header the chain writes before judging step k (1-based as in the prompt): "Step k:"."""
        head = self.v.fmt.step_template.split("{text}")[0].format(k=k + self.v.fmt.step_base - 1).rstrip()
        return head or f"Step {k}:"

    @staticmethod
    def run_batch(v: Any, items: list) -> list:
        """items: (state, problem, steps, key); every session's chains in one generate call, then the final
        question (ThinkPRM) in one more."""
        c, fmt, tok = v.config, v.fmt, v.tok
        targets, prompts, params = [], [], []
        for state, problem, steps, key in items:
            n = len(steps)
            text = fmt.render(problem, steps, tok)
            prompt = v.encode(text)
            state.prompt = prompt
            v._texts[key] = text  # released ThinkPRM scoring reads the prompt text (Verifier._select_verdicts)
            stops = tuple(dict.fromkeys(v.stops(text, n) + (state._header(n + 1),) + _final_stop(fmt)))
            if not state.bodies:  # the first step: K chains in one request, as verify() runs a one-step record
                targets.append((state, None, key))
                prompts.append(prompt)
                params.append(v.params(c.num_chains, c.max_tokens, v.seed(state.index), stop=stops,
                                       logprob_ids=v.verdict_ids))
                continue
            state.bodies = [copy.deepcopy(t) for t in state.bodies]  # forks share the earlier bodies
            for k, turn in enumerate(state.bodies):
                if turn.finish_reason in ("length", "error") or len(turn.token_ids) + 8 >= c.max_tokens:
                    continue  # out of tokens: the new step stays unscored on this chain
                state._carry(turn, n)
                turn.prompt_ids = prompt
                targets.append((state, turn, key))
                prompts.append(prompt + turn.token_ids)
                params.append(v.params(1, c.max_tokens - len(turn.token_ids), v.seed(state.index, k, n),
                                       stop=stops, logprob_ids=v.verdict_ids))
        try:
            results, failed = PerStepState._run(v, items, targets, prompts, params)
        finally:
            for _, _, _, key in items:
                v._texts.pop(key, None)
        outcomes = []
        for state, problem, steps, key in items:
            if key in failed:
                outcomes.append((None, [], f"step {len(steps)}: {failed[key]}"))
                continue
            res = results[key]
            v._score(res, steps)
            state.result_chains = res.chains
            outcomes.append((res.scores, [state.prompt + t.token_ids for t in state.bodies], None))
        return outcomes

    @staticmethod
    def _run(v: Any, items: list, targets: list, prompts: list, params: list) -> tuple[dict, dict]:
        """The new step's chains, then the final verdicts; returns the VerificationResult per key, and why a key's
        step failed (its first step's request, or every chain it extended this round, failed in the engine: a
        prompt past the context) for the keys that failed; the others go on."""
        from prmkern.verify.protocols import Chain, Turn, VerificationResult
        outs = v.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        errors: dict[Any, list[str]] = {}
        extended: dict[Any, int] = {}
        for (state, turn, key), out in zip(targets, outs):
            extended[key] = extended.get(key, 0) + 1
            if out.error is not None:
                errors.setdefault(key, []).append(out.error)
            if turn is None:
                for o in out.outputs if out.error is None else []:
                    body = Turn(prompt_ids=state.prompt)
                    v._absorb(body, o)
                    state.bodies.append(body)
            elif out.error is not None:
                turn.finish_reason = "error"  # one chain past the context: the step stays unscored on it
            else:
                v._absorb(turn, out.outputs[0])
        failed = {key: errs[0] for key, errs in errors.items() if len(errs) == extended[key]}
        live = [(state, problem, steps, key) for state, problem, steps, key in items if key not in failed]
        results = {key: VerificationResult(state.index, len(steps), None,
                                           [Chain(turns=[copy.deepcopy(t)]) for t in state.bodies])
                   for state, _, steps, key in live}
        if v.final_ids is not None and live:  # the protocol's own coroutine (Verifier._final_verdicts), one round
            run_rounds(v.llm, v._final_verdicts([(key, problem, steps) for _, problem, steps, key in live], results))
        return results, failed

    def _carry(self, turn: Any, n: int) -> None:
        """Cuts the chain where it would start judging step n (its stop, or the start of its final verdict) and
        appends "Step n:"."""
        v, fmt = self.v, self.v.fmt
        header = self._header(n)
        stopped_at_header = turn.finish_reason == "stop" and turn.stop_reason == header
        v._append_text(turn, "", drop_stop=turn.finish_reason == "stop")
        text = v.tok.decode(turn.token_ids)
        if not stopped_at_header and fmt.final_regex:
            m = re.search(fmt.final_regex, text, 0 if fmt.case_sensitive else re.IGNORECASE)
            if m:  # the chain had concluded: its final statement goes, the new step is judged instead
                _cut_chars(v, turn, m.start())
                text = v.tok.decode(turn.token_ids)
        v._append_text(turn, ("" if stopped_at_header or text.endswith("\n") else "\n") + header, drop_stop=False)

    def chain_scores(self):
        return [ch.scores for ch in self.result_chains]

    def chains(self):
        return self.result_chains

    def fork(self):
        child = copy.copy(self)
        child.bodies = list(self.bodies)  # the turns themselves are copied before a round mutates them
        return child

    def close(self) -> None:
        pass


def _final_stop(fmt: Any) -> tuple[str, ...]:
    """The text that opens a per-step chain's final verdict ("Is the solution correct?"), as a stop: a session round
    ends where the chain would conclude, since the next step would cut the conclusion again. From final_prefix, else
    the literal start of final_regex."""
    if fmt.final_prefix and fmt.final_prefix.strip():
        return (fmt.final_prefix.strip(),)
    if not fmt.final_regex:
        return ()
    out, i, rx = [], 0, fmt.final_regex
    while i < len(rx):
        ch = rx[i]
        if ch == "\\" and i + 1 < len(rx) and not rx[i + 1].isalnum():
            out.append(rx[i + 1])
            i += 2
        elif ch.isalnum() or ch in " ,':":
            out.append(ch)
            i += 1
        else:
            break
    literal = "".join(out).strip()
    return (literal,) if len(literal) >= 4 else ()


def _cut_chars(v: Any, turn: Any, cut: int) -> None:
    """Keeps the turn's text before character `cut` (tokens wholly before it as generated, the straddling token's
    part re-encoded)."""
    from prmkern.verify.scoring import token_char_offsets
    ids = turn.token_ids
    decoded = v.tok.decode(ids)
    offsets = token_char_offsets(ids, v.tok)
    ends = offsets[1:] + [len(decoded)]
    keep = sum(1 for e in ends if e <= cut)
    start = offsets[keep] if keep < len(offsets) else cut
    tail = v.tok.encode(decoded[start:cut], add_special_tokens=False) if cut > start else []
    del turn.token_ids[keep:], turn.token_logprobs[keep:]
    turn.token_ids.extend(tail)
    turn.token_logprobs.extend({} for _ in tail)


STATES = {"per_step": PerStepState, "per_paragraph": ParagraphState, "discriminative": DiscriminativeState}

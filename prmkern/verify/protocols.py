"""The verifier protocols: run a generative verifier over (problem, steps) records through the engine.

* Parallel scaling: K chains per record in one request (`n=K`), so the prompt is prefilled once and its KV blocks
  are shared by every chain.
* Sequential scaling (budget forcing): a chain that ends before `budget_tokens` generated tokens has its end marker
  removed and `continuation` appended, and goes on; all such chains of a round are resubmitted in one batch, and
  the prefix cache makes each resubmission cost only the new tokens.
* GenPRM code verification: a paragraph turn that stops after a python block has the code run in the sandbox
  (one persistent namespace per chain, as GenPRM does), its output appended in the trained format, and
  generation goes on; code from every chain of a round runs concurrently.

Chains are resubmitted as token ids (the prompt, the tokens generated so far, then the appended text), never as
re-tokenised text, so a resubmission hits the prefix cache up to the last full block. Verdicts are parsed
(parsing.py) and scored from the engine's chosen-token log-probabilities (scoring.py).
It does not load models, render data sets or write files; see cli.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from prmkern.sampling import SamplingParams
from prmkern.sandbox import SandboxLimits, SessionPool
from prmkern.verify.formats import VerifierFormat, get_format
from prmkern.verify.parsing import ParsedOutput, parse_output
from prmkern.verify.scoring import (ChainScores, Generated, SolutionScores, aggregate, score_chain,
                                    token_char_offsets)


@dataclass
class VerifyConfig:
    format: str | VerifierFormat = "thinkprm"
    num_chains: int = 8  # K: parallel chains per record
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 2048  # per chain (all rounds together)
    method: str = "min"  # solution score: min | last | mean | product
    threshold: float = 0.5  # earliest error: first step whose score is below this
    seed: int | None = 0
    budget_tokens: int | None = None  # budget forcing: a chain may not end before this many generated tokens
    continuation: str = "\nWait, let me check that again.\n"
    max_forcing_rounds: int = 4
    max_code_rounds: int = 3  # GenPRM: code executions per paragraph turn
    code_limits: SandboxLimits = field(default_factory=lambda: SandboxLimits(wall_time_s=10, cpu_time_s=5))

    def __post_init__(self) -> None:
        self.format = get_format(self.format)
        if not isinstance(self.num_chains, int) or self.num_chains < 1:
            raise ValueError(f"num_chains={self.num_chains!r} is invalid; accepted: an int >= 1")
        if self.budget_tokens is not None and not 0 < self.budget_tokens <= self.max_tokens:
            raise ValueError(f"budget_tokens={self.budget_tokens!r} is invalid; accepted: None or an int in "
                             f"(0, max_tokens={self.max_tokens}]")


@dataclass
class Chain:
    """One verification chain. For single-turn formats `turns` has one entry; GenPRM has one per paragraph."""

    turns: list["Turn"] = field(default_factory=list)
    scores: ChainScores | None = None
    forced_rounds: int = 0
    code_runs: list[dict[str, Any]] = field(default_factory=list)


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


@dataclass
class VerificationResult:
    record_id: Any
    num_steps: int
    scores: SolutionScores | None
    chains: list[Chain]
    error: str | None = None

    @property
    def prediction(self) -> int | None:
        """Earliest wrong step (-1: none), or None when no step got a score: never a silent guess."""
        if self.scores is None or self.scores.score is None:
            return None
        return self.scores.earliest_error

    def to_json(self, tokenizer: Any, include_chains: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.record_id, "error": self.error, "prediction": self.prediction}
        if self.scores is not None:
            s = self.scores
            out.update(step_scores=[st.score for st in s.steps], step_coverage=[st.coverage for st in s.steps],
                       solution_score=s.score, method=s.method, earliest_error=s.earliest_error,
                       threshold=s.threshold, verdict_counts=s.counts, unscored_steps=s.unscored_steps)
        if include_chains:
            out["chains"] = [{"text": [tokenizer.decode(t.token_ids) for t in c.turns],
                              "verdicts": [v.status for v in c.scores.steps] if c.scores else None,
                              "p_correct": [v.p_correct for v in c.scores.steps] if c.scores else None,
                              "finish_reason": c.turns[-1].finish_reason if c.turns else None,
                              "forced_rounds": c.forced_rounds, "code_runs": c.code_runs} for c in self.chains]
        return out


def _validate_record(rec: Any) -> tuple[str, list[str]]:
    if not isinstance(rec, dict) or not isinstance(rec.get("problem"), str) or not isinstance(rec.get("steps"), list):
        raise ValueError("a record needs 'problem' (str) and 'steps' (list of str); got "
                         f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
    if not rec["steps"] or not all(isinstance(s, str) and s.strip() for s in rec["steps"]):
        raise ValueError("'steps' must be a non-empty list of non-empty strings")
    return rec["problem"], rec["steps"]


class Verifier:
    """Scores the steps of solutions with a generative verifier running on `llm` (a prmkern.LLM)."""

    def __init__(self, llm: Any, config: VerifyConfig | None = None):
        self.llm = llm
        self.tok = llm.tokenizer
        if self.tok is None:
            raise ValueError("verification needs a tokenizer; the checkpoint has none")
        self.config = config or VerifyConfig()
        self.fmt: VerifierFormat = self.config.format  # type: ignore[assignment]
        self.verdict_ids = None if self.fmt.kind == "earliest_error" else self.fmt.verdict_token_ids(self.tok)

    # -- public ---------------------------------------------------------------------------------------------
    def verify(self, records: Sequence[dict[str, Any]],
               progress: Callable[[int], None] | None = None) -> list[VerificationResult]:
        """One VerificationResult per record, in order. A malformed record fails alone (`.error`)."""
        results: list[VerificationResult] = []
        jobs: list[tuple[int, str, list[str]]] = []
        for i, rec in enumerate(records):
            rid = rec.get("id", i) if isinstance(rec, dict) else i
            try:
                problem, steps = _validate_record(rec)
                jobs.append((i, problem, steps))
                results.append(VerificationResult(rid, len(steps), None, []))
            except ValueError as e:
                results.append(VerificationResult(rid, 0, None, [], str(e)))
        if self.fmt.kind == "per_paragraph":
            self._run_paragraphs(jobs, results)
        else:
            self._run_single_turn(jobs, results)
        for i, problem, steps in jobs:
            res = results[i]
            if res.error is None:
                self._score(res, steps)
            if progress is not None:
                progress(1)
        return results

    # -- single-turn formats (ThinkPRM, critic): K chains + budget forcing -----------------------------------------
    def _params(self, n: int, max_tokens: int, seed: int | None, stop: Sequence[str] = (),
                include_stop: bool = False) -> SamplingParams:
        c = self.config
        return SamplingParams(n=n, temperature=c.temperature, top_p=c.top_p, max_tokens=max(1, max_tokens),
                              seed=seed, stop=list(self.fmt.stop) + list(stop),
                              include_stop_str_in_output=include_stop,
                              logprob_token_ids=list(self.verdict_ids) if self.verdict_ids else None)

    def _seed(self, *parts: int) -> int | None:
        return None if self.config.seed is None else hash((self.config.seed, *parts)) & ((1 << 62) - 1)

    def _run_single_turn(self, jobs, results) -> None:
        c = self.config
        prompts, params = [], []
        for i, problem, steps in jobs:
            text = self.fmt.render(problem, steps, self.tok)
            prompts.append(self.tok.encode(text, add_special_tokens=False))
            params.append(self._params(c.num_chains, c.max_tokens, self._seed(i)))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        for (i, _, _), prompt, out in zip(jobs, prompts, outs):
            if out.error is not None:
                results[i].error = out.error
                continue
            for o in out.outputs:
                turn = Turn(prompt_ids=prompt)
                self._absorb(turn, o)
                results[i].chains.append(Chain(turns=[turn]))
        if c.budget_tokens is None:
            return
        for round_ in range(c.max_forcing_rounds):
            pending = [(i, k, ch) for i, _, _ in jobs for k, ch in enumerate(results[i].chains)
                       if self._wants_forcing(ch)]
            if not pending:
                break
            prompts, params = [], []
            for i, k, ch in pending:
                turn = ch.turns[0]
                self._append_text(turn, c.continuation, drop_stop=True)
                ch.forced_rounds += 1
                prompts.append(turn.prompt_ids + turn.token_ids)
                params.append(self._params(1, c.max_tokens - len(turn.token_ids), self._seed(i, k, round_ + 1)))
            for (i, k, ch), out in zip(pending, self.llm.generate(prompts, params, use_tqdm=False)):
                if out.error is not None:
                    ch.turns[0].finish_reason = "error"
                    continue
                self._absorb(ch.turns[0], out.outputs[0])

    def _wants_forcing(self, ch: Chain) -> bool:
        turn = ch.turns[0]
        c = self.config
        return (turn.finish_reason == "stop" and len(turn.token_ids) < c.budget_tokens
                and len(turn.token_ids) + 8 < c.max_tokens)  # room for the continuation and some more text

    # -- GenPRM: one turn per paragraph, with code rounds ------------------------------------------------------
    def _run_paragraphs(self, jobs, results) -> None:
        c = self.config
        fmt = self.fmt
        pool = SessionPool(c.code_limits)
        try:
            for i, _, _ in jobs:
                results[i].chains = [Chain() for _ in range(c.num_chains)]
            max_steps = max((len(steps) for _, _, steps in jobs), default=0)
            for p in range(max_steps):
                # Open paragraph p's turn for every chain of every record that has that paragraph.
                active: list[tuple[int, int, Chain]] = []
                for i, problem, steps in jobs:
                    if p >= len(steps) or results[i].error is not None:
                        continue
                    for k, ch in enumerate(results[i].chains):
                        history = [self.tok.decode(t.token_ids, skip_special_tokens=True) for t in ch.turns]
                        text = fmt.render(problem, steps, self.tok, paragraph=p, history=history)
                        ch.turns.append(Turn(prompt_ids=self.tok.encode(text, add_special_tokens=False)))
                        active.append((i, k, ch))
                for round_ in range(c.max_code_rounds + 1):
                    if not active:
                        break
                    last = round_ == c.max_code_rounds
                    prompts = [ch.turns[-1].prompt_ids + ch.turns[-1].token_ids for _, _, ch in active]
                    params = [self._params(1, c.max_tokens - len(ch.turns[-1].token_ids), self._seed(i, k, p, round_),
                                           stop=() if last else fmt.code_stop, include_stop=True)
                              for i, k, ch in active]
                    outs = self.llm.generate(prompts, params, use_tqdm=False)
                    to_run: list[tuple[tuple[int, int], str, Chain]] = []
                    for (i, k, ch), out in zip(active, outs):
                        turn = ch.turns[-1]
                        if out.error is not None:
                            turn.finish_reason, turn.done = "error", True
                            continue
                        self._absorb(turn, out.outputs[0])
                        if turn.stop_reason in fmt.code_stop:
                            code = self._last_code(turn)
                            if code is not None:
                                to_run.append(((i, k), code, ch))
                                continue
                        turn.done = True
                    if to_run:
                        runs = pool.run_many([(key, code) for key, code, _ in to_run])
                        for (key, code, ch), res in zip(to_run, runs):
                            output = (res.stdout + res.stderr).strip() or f"[{res.status}]"
                            ch.code_runs.append({"paragraph": p, "status": res.status, "code": code,
                                                 "output": output[:2000]})
                            self._append_text(ch.turns[-1], fmt.code_output_template.format(output=output),
                                              drop_stop=False)
                    active = [(i, k, ch) for i, k, ch in active if not ch.turns[-1].done]
        finally:
            pool.close_all()

    def _last_code(self, turn: Turn) -> str | None:
        text = self.tok.decode(turn.token_ids, skip_special_tokens=True)
        matches = list(re.finditer(self.fmt.code_regex, text, re.DOTALL)) if self.fmt.code_regex else []
        return matches[-1].group("code") if matches else None

    # -- token bookkeeping ---------------------------------------------------------------------------------------
    def _absorb(self, turn: Turn, out: Any) -> None:
        """Adds one generation round's output to the turn."""
        turn.last_round_start = len(turn.token_ids)
        if isinstance(out.stop_reason, str):
            # Where the engine cut the text: the stop string starts here in decode(turn.token_ids).
            before = self.tok.decode(turn.token_ids)
            turn.stop_cut = len(before) + len(out.text) - (len(out.stop_reason) if out.text.endswith(
                out.stop_reason) else 0)
        else:
            turn.stop_cut = None
        turn.token_ids.extend(out.token_ids)
        lps = out.token_logprobs if out.token_logprobs is not None else [{} for _ in out.token_ids]
        turn.token_logprobs.extend(lps)
        turn.finish_reason, turn.stop_reason = out.finish_reason, out.stop_reason

    def _append_text(self, turn: Turn, text: str, drop_stop: bool) -> None:
        """Appends `text` after the turn's tokens. With drop_stop, the end of the last round (EOS, a stop token or
        a stop string) is cut first: tokens wholly before the cut are kept as generated (with their log-
        probabilities); a token straddling it is replaced by re-encoding its text before the cut along with `text`."""
        ids = turn.token_ids
        keep, tail = len(ids), ""
        if drop_stop and ids:
            if isinstance(turn.stop_reason, str) and turn.stop_cut is not None:
                decoded = self.tok.decode(ids)
                offsets = token_char_offsets(ids, self.tok)
                ends = offsets[1:] + [len(decoded)]
                keep = sum(1 for e in ends if e <= turn.stop_cut)  # tokens ending at or before the cut
                start = offsets[keep] if keep < len(offsets) else turn.stop_cut
                tail = decoded[start:turn.stop_cut]
            elif turn.finish_reason == "stop":  # EOS or a stop token id: the last token
                keep = len(ids) - 1
        new = self.tok.encode(tail + text, add_special_tokens=False)
        del turn.token_ids[keep:], turn.token_logprobs[keep:]
        turn.token_ids.extend(new)
        turn.token_logprobs.extend({} for _ in new)

    # -- scoring -----------------------------------------------------------------------------------------------
    def _score(self, res: VerificationResult, steps: list[str]) -> None:
        if not res.chains:
            return
        n = len(steps)
        for ch in res.chains:
            texts = [self.tok.decode(t.token_ids) for t in ch.turns]
            finished = [t.finish_reason not in ("length", "error") for t in ch.turns]
            if self.fmt.kind == "per_paragraph":
                parsed: ParsedOutput = parse_output(self.fmt, texts, n, finished=finished)
                gens = []
                for t in ch.turns:
                    # Only the last round is scored: verdicts come after the code output.
                    start_text = len(self.tok.decode(t.token_ids[:t.last_round_start]))
                    last = t.token_ids[t.last_round_start:]
                    gens.append(Generated(last, t.token_logprobs[t.last_round_start:], text_start=start_text,
                                          offsets=token_char_offsets(last, self.tok)))
                ch.scores = score_chain(self.fmt, parsed, gens, verdict_ids=self.verdict_ids, tokenizer=self.tok)
            else:
                turn = ch.turns[0]
                parsed = parse_output(self.fmt, texts[0], n, finished=finished[0])
                ch.scores = score_chain(self.fmt, parsed, Generated(turn.token_ids, turn.token_logprobs),
                                        verdict_ids=self.verdict_ids, tokenizer=self.tok)
        res.scores = aggregate([ch.scores for ch in res.chains], n, method=self.config.method,
                               threshold=self.config.threshold)

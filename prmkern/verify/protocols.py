"""The verifier protocols: run a generative verifier over (problem, steps) records through the engine.

* Parallel scaling: K chains per record in one request (`n=K`), so the prompt is prefilled once and its KV blocks
  are shared by every chain.
* ThinkPRM (per_step formats with a final_prefix), as its thinkprm_api.py: the chain stops at "Is the solution
  correct?", `</think>`, EOS or "Step {n+1}:"; then "\nIs the solution correct? " is appended and one position is
  read for P(yes) / (P(yes) + P(no)) (exact log-probabilities of the two label tokens).
* Sequential scaling (budget forcing): a chain that ends before `budget_tokens` generated tokens has its end removed
  (the stop string, `</think>` included, or EOS: so it continues inside the thinking) and a continuation appended
  (the format's phrases by round: ThinkPRM's released trigger phrases), and goes on; all such chains of a round are
  resubmitted in one batch, and the prefix cache makes each resubmission cost only the new tokens.
* GenPRM: genprm_protocol.py (its staged paragraph turns, code rounds and Maj@N).
* ProcessBench critic: K chains, the plurality of their boxed answers (method "vote").
* Discriminative PRMs (Qwen2.5-Math-PRM, format qwen-prm): discriminative.py (one pooled forward pass per solution).

Its settings are a VerifyConfig (verify_config.py); what it produces, results.py. Verdicts are parsed
(parsing.py) and scored from the engine's chosen-token log-probabilities (scoring.py).
It does not load models, render data sets or write files; see prmkern/cli/.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

from prmkern.sampling_params import SamplingParams, derive_seed
from prmkern.textcheck import control_strings, defuse_control_text
from prmkern.verify.continuous import Round
from prmkern.verify.formats import VerifierFormat
from prmkern.verify.parsing import parse_output
from prmkern.verify.released_scoring import SGLANG_FAILED_SCORE, sglang_select_score
from prmkern.verify.scoring import Generated, aggregate, score_chain, token_char_offsets, verdict_probability
# re-exported here, their historical home: `from prmkern.verify.protocols import VerifyConfig, VerificationResult`
from prmkern.verify.results import Chain, Turn, VerificationResult, check_label, check_record  # noqa: F401
from prmkern.verify.verify_config import VerifyConfig  # noqa: F401


class Verifier:
    """Scores the steps of solutions with a generative verifier running on `llm` (a prmkern.LLM)."""

    def __init__(self, llm: Any, config: VerifyConfig | None = None):
        self.llm = llm
        self.tok = llm.tokenizer
        if self.tok is None:
            raise ValueError("verification needs a tokenizer; the checkpoint has none")
        self.config = config or VerifyConfig()
        self.control_words = control_strings(self.tok)  # texts the tokenizer would turn into control tokens
        self.fmt: VerifierFormat = self.config.format  # type: ignore[assignment]
        self._sessions: Any = None  # the SessionManager, made by the first open()
        self.verdict_ids: tuple[int, int] | None = None
        self._settle_tokens: dict[int, bool] = {}
        # per record key: its prompt text and stop strings (kept for the record's later rounds; keys are unique
        # within one Verifier, whose protocol may run for several records at once: continuous.py)
        self._texts: dict[Any, str] = {}
        self._stops: dict[Any, tuple[str, ...]] = {}
        self.final_ids: tuple[int, int] | None = None
        # streamed verdicts (streaming.py): called with each event, {"solution": record key, "type": ...}
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        # record keys a search dropped while streaming: their chains are aborted once decided (early_exit.py)
        self.drop_keys: set | None = None
        if self.fmt.kind == "per_step":
            self.verdict_ids = self.fmt.verdict_token_ids(self.tok)
            if self.fmt.final_prefix:
                self.final_ids = self._word_ids(self.fmt.final_labels, first=True)
        elif self.fmt.kind == "per_paragraph":
            # GenPRM reads tokenizer.encode(word)[-1] for "Yes" and "No".
            self.verdict_ids = self._word_ids((self.fmt.correct_text, self.fmt.incorrect_text), first=False)
        elif self.fmt.kind == "discriminative":
            from prmkern.verify.discriminative import check_discriminative
            check_discriminative(self)
        if self.fmt.kind != "discriminative" and getattr(getattr(llm, "engine", None), "is_pooling_model", False):
            raise ValueError(f"this checkpoint is a discriminative PRM (Qwen2ForProcessRewardModel): it cannot run "
                             f"the generative format {self.fmt.name!r}; use format 'qwen-prm'")

    def for_best_of_n(self) -> "Verifier":
        """The verifier that scores best-of-N candidates. Released ThinkPRM (search-and-learn/scripts/
        test_time_compute.py L59: process_verifier only for beam search; prm/thinkprm_api.py: step_string "") shows
        the steps without "Step i:" labels and stops at no step number; every other case is this verifier."""
        if not (self.released and self.fmt.name == "thinkprm"):
            return self
        fmt = dataclasses.replace(self.fmt, step_template="{text}", step_stop_template=None)
        return Verifier(self.llm, dataclasses.replace(self.config, format=fmt))

    def best_of_n_steps(self, text: str) -> list[str] | None:
        """Released ThinkPRM splits a candidate as its score() does: "## Step" -> "Step", then on "Step \\d+:", the
        pieces stripped, empty ones dropped; None: the caller's own splitting."""
        if not (self.released and self.fmt.name == "thinkprm"):
            return None
        pieces = re.split(r"Step \d+:", text.replace("## Step", "Step").strip())
        return [p.strip() for p in pieces if p.strip()]

    @property
    def released(self) -> bool:
        return self.config.scoring == "released"

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids. Released: as the release's server tokenised text prompts, with the tokenizer's special
        tokens added (R1-Distill's BOS comes a second time after the chat template's); exact: the text alone."""
        return self.tok.encode(text, add_special_tokens=self.released)

    def stops(self, prompt_text: str, num_steps: int) -> tuple[str, ...]:
        """The chain's stop strings. Released ThinkPRM (thinkprm_api.py, cot_eval): "Step {m + 1}:" with m the
        lexicographic maximum of the "Step (\\d+):" numbers of the whole prompt (1 when there is none), so a
        10-step solution stops at "Step 10:"; exact: "Step {n + 1}:"."""
        if not (self.released and self.fmt.step_stop_template and self.fmt.name == "thinkprm"):
            return self.fmt.stops(num_steps)
        found = re.findall(r"Step (\d+):", prompt_text)
        m = int(max(found)) if found else 1
        return tuple(self.fmt.stop) + (self.fmt.step_stop_template.format(n=m + 1),)

    def _word_ids(self, words: Sequence[str], first: bool) -> tuple[int, int]:
        ids = []
        for w in words:
            enc = self.tok.encode(w, add_special_tokens=False)
            if not enc:
                raise ValueError(f"format {self.fmt.name!r}: {w!r} encodes to no token")
            ids.append(enc[0] if first else enc[-1])
        if ids[0] == ids[1]:
            raise ValueError(f"format {self.fmt.name!r}: {words[0]!r} and {words[1]!r} share the token {ids[0]}")
        return ids[0], ids[1]

    # -- public ---------------------------------------------------------------------------------------------
    def open(self, problem: str, index: int = 0) -> Any:
        """A forkable verification session over `problem` (prmkern/verify/sessions.py): add_step, fork, close.
        `index`: the record index whose seeds it uses (a session equals verify() of that record where the format
        allows). Limits: `self.sessions.limits` (a SessionLimits)."""
        return self.sessions.open(problem, index)

    @property
    def sessions(self) -> Any:
        if self.config.chains_min is not None:  # sessions run num_chains per step; no waves there
            raise ValueError(f"verification sessions run a fixed num_chains; chains_min={self.config.chains_min} "
                             f"(the adaptive chain count) does not apply to them; accepted: a VerifyConfig without "
                             f"chains_min, or verify() / stream()")
        if self._sessions is None:
            from prmkern.verify.sessions import SessionManager
            self._sessions = SessionManager(self)
        return self._sessions

    def verify(self, records: Sequence[dict[str, Any]],
               progress: Callable[[int], None] | None = None) -> list[VerificationResult]:
        """One VerificationResult per record, in order. A malformed record fails alone (`.error`)."""
        results, jobs = self.prepare_records(records)
        from prmkern.verify.continuous import run_rounds
        run_rounds(self.llm, self.protocol(jobs, results))
        if progress is not None:
            progress(len(jobs))
        metrics = getattr(getattr(self.llm, "engine", None), "metrics", None)  # prmkern:verifications, _chains
        if metrics is not None:
            done = [r for r in results if r.error is None]
            metrics.count_verifications(len(done), sum(len(r.chains) for r in done))
        return results

    def protocol(self, jobs: list[tuple[Any, str, list[str]]], results: Any) -> Any:
        """The protocol over `jobs` [(key, problem, steps)] as a coroutine (continuous.py): it yields each round's
        continuous.Round and gets its outputs back; at its end results[key] holds each record's scores."""
        try:
            if self.fmt.kind == "per_paragraph":
                from prmkern.verify.genprm_protocol import run_paragraphs
                yield from run_paragraphs(self, jobs, results)
            elif self.fmt.kind == "discriminative":
                from prmkern.verify.discriminative import run_discriminative
                yield from run_discriminative(self, jobs, results)
            else:
                yield from self._run_single_turn(jobs, results)
            for i, problem, steps in jobs:
                res = results[i]
                if res.error is None and self.fmt.kind not in ("per_paragraph", "discriminative"):
                    self._score(res, steps)
                if res.scores is not None and res.stopped_at is not None:
                    from prmkern.verify.early_exit import stopped_step
                    stopped_step(res.scores, res.stopped_at, self.config.threshold)
        finally:
            for i, _, _ in jobs:
                self._texts.pop(i, None)
                self._stops.pop(i, None)

    # -- single-turn formats (ThinkPRM, critic): K chains + budget forcing + the forced final verdict -------------
    def params(self, n: int, max_tokens: int, seed: int | None, stop: Sequence[str] = (),
               include_stop: bool = False, logprob_ids: Sequence[int] | None = None,
               greedy: bool = False, top_logprobs: int | None = None) -> SamplingParams:
        c = self.config
        temperature, top_k = (0.0 if greedy else c.temperature), c.top_k
        if n > 1 and temperature < 1e-5:
            # K greedy chains (vLLM, and so SamplingParams, refuse greedy n > 1): top-1 sampling draws the argmax
            # every time, so the K chains are the greedy chain, forked from one prefill as sampled chains are.
            temperature, top_k = 1.0, 1
        return SamplingParams(n=n, temperature=temperature, top_p=c.top_p, top_k=top_k,
                              max_tokens=max(1, max_tokens), seed=seed, stop=list(stop) or None,
                              include_stop_str_in_output=include_stop, logprobs=top_logprobs,
                              logprob_token_ids=list(logprob_ids) if logprob_ids else None)

    def seed(self, *parts: Any) -> int | None:
        return None if self.config.seed is None else derive_seed(self.config.seed, *parts)

    def prepare_records(self, records: Sequence[Any]) -> tuple[list[VerificationResult], list[tuple[int, str, list]]]:
        """(one VerificationResult per record, the (index, problem, steps) jobs of the well-formed ones): a malformed
        record's result carries its error and it gets no job, so it fails alone."""
        results: list[VerificationResult] = []
        jobs: list[tuple[int, str, list[str]]] = []
        for i, rec in enumerate(records):
            rid = rec.get("id", i) if isinstance(rec, dict) else i
            try:
                problem, steps = self.prepare(rec)
                jobs.append((i, problem, steps))
                results.append(VerificationResult(rid, len(steps), None, [], scoring=self.config.scoring))
            except ValueError as e:
                results.append(VerificationResult(rid, 0, None, [], str(e), scoring=self.config.scoring))
        return results, jobs

    def prepare(self, rec: Any) -> tuple[str, list[str]]:
        """A record's (problem, steps), checked (ValueError says what is wrong), its text unable to become control
        tokens (<|im_end|>...): the same rule for every format and every driver (verify, continuous.py)."""
        problem, steps = check_record(rec)
        problem = defuse_control_text(problem, self.control_words)
        return problem, [defuse_control_text(s, self.control_words) for s in steps]

    def _may_settle(self, token: int) -> bool:
        """Whether this token's text may complete a step header or close a verdict slot (early exit re-reads a
        chain only then); formats whose header does not end in ':' or whose slot does not close with '}': always."""
        hit = self._settle_tokens.get(token)
        if hit is None:
            fmt = self.fmt
            if (fmt.step_header_regex or "").endswith(":") and fmt.verdict_regex.endswith(r"(?P<close>\})?"):
                piece = self.tok.decode([token])
                hit = ":" in piece or "}" in piece
            else:
                hit = True
            self._settle_tokens[token] = hit
        return hit

    def first_wave(self) -> int:
        """Chains a record starts with. Stop at the first error draws a solution's K chains in two waves: the first
        wave is the fewest chains whose verdicts alone can settle every step (a step's bounds clear the threshold
        only once more than K x max(t, 1 - t) chains have judged it, early_exit.RecordWatch._decide); the rest run
        only for a solution the first wave left undecided. Chain k samples as chain k of one n=K request whatever its
        wave (SamplingParams.first_chain), so the chains, and the prediction, are those of a full run."""
        c = self.config
        if c.chains_min is not None:  # adaptive chain count: the first wave (adaptive.py)
            return c.chains_min
        if not c.stop_at_first_error:
            return c.num_chains
        return min(c.num_chains, int(c.num_chains * max(c.threshold, 1 - c.threshold)) + 1)

    def _run_single_turn(self, jobs, results) -> Any:  # a coroutine of Rounds
        c = self.config
        prompts, params = [], []
        watch = records = None
        if (c.stop_at_first_error or self.on_event is not None) and c.chains_min is None:
            from prmkern.verify.early_exit import ChainWatch, RecordWatch
            watch, records = ChainWatch(), {}
        wave = self.first_wave()
        for i, problem, steps in jobs:
            text = self.fmt.render(problem, steps, self.tok)
            self._texts[i], self._stops[i] = text, self.stops(text, len(steps))
            prompts.append(self.encode(text))
            params.append(self.params(wave, c.max_tokens, self.seed(i), stop=self._stops[i],
                                      logprob_ids=self.verdict_ids))
            if watch is not None:
                records[i] = RecordWatch(self, len(steps), c.num_chains, self._events_of(i),
                                         stop=c.stop_at_first_error, key=i)
                watch.add(records[i])
        if c.chains_min is not None:  # adaptive chain count: waves until the stopping rule holds (adaptive.py)
            from prmkern.verify.adaptive import run_waves
            yield from run_waves(self, jobs, prompts, params, results)
        else:
            outs = yield Round(prompts, params, watch)
            self._take_chains(jobs, prompts, outs, results)
        if wave < c.num_chains and c.chains_min is None:  # the second wave: the solutions the first left undecided
            later = [(n, job) for n, job in enumerate(jobs) if results[job[0]].error is None
                     and records[job[0]].decided is None]
            watch = ChainWatch()
            for _, (i, _, _) in later:
                watch.add(records[i], first=wave)
            outs = (yield Round([prompts[n] for n, _ in later],
                                [dataclasses.replace(params[n], n=c.num_chains - wave, first_chain=wave)
                                 for n, _ in later], watch)) if later else []
            self._take_chains([job for _, job in later], [prompts[n] for n, _ in later], outs, results)
        for i, _, _ in jobs:
            if records is not None and records[i].halted:  # stopped, or dropped by a search (streaming.py)
                results[i].stopped_at = records[i].decided
        steps_of = {i: steps for i, _, steps in jobs}
        if c.budget_tokens is not None:
            yield from self._force(jobs, results, steps_of)
        if self.final_ids is not None:
            yield from self._final_verdicts(jobs, results)

    def _events_of(self, key: Any) -> Callable[[dict[str, Any]], None] | None:
        if self.on_event is None:
            return None
        on_event = self.on_event
        return lambda ev: on_event({"solution": key, **ev})

    def stream(self, records: Sequence[dict[str, Any]], max_chains: int = 64, drops: set | None = None) -> Any:
        """Verifies `records` like verify(), yielding events as verdicts are parsed (streaming.py): per step of a
        solution its chains' P(correct) and running mean, when its earliest error is decided, and its result.
        drops: solution indices the caller adds while iterating, to abort them once decided (a search's pruning)."""
        from prmkern.verify.streaming import stream_verify
        return stream_verify(self, records, max_chains=max_chains, drops=drops)

    def _take_chains(self, jobs, prompts, outs, results) -> None:
        for (i, _, _), prompt, out in zip(jobs, prompts, outs):
            if out.error is not None:
                results[i].error = out.error
                continue
            for o in out.outputs:
                turn = Turn(prompt_ids=prompt)
                self._absorb(turn, o)
                results[i].chains.append(Chain(turns=[turn]))

    def _force(self, jobs, results, steps_of) -> Any:  # a coroutine of Rounds
        c = self.config
        for round_ in range(c.max_forcing_rounds):
            pending = [(i, k, ch) for i, _, _ in jobs for k, ch in enumerate(results[i].chains)
                       if ch.error is None and results[i].stopped_at is None and self._wants_forcing(ch)]
            if not pending:
                break
            prompts, params = [], []
            for i, k, ch in pending:
                turn = ch.turns[0]
                self._append_text(turn, c.continuation_for(round_), drop_stop=True)
                ch.forced_rounds += 1
                prompts.append(turn.prompt_ids + turn.token_ids)
                params.append(self.params(1, c.max_tokens - len(turn.token_ids), self.seed(i, k, round_ + 1),
                                          stop=self._stops[i], logprob_ids=self.verdict_ids))
            watch = records = None
            if c.stop_at_first_error or self.on_event is not None:
                from prmkern.verify.early_exit import ChainWatch, RecordWatch
                watch, records = ChainWatch(), {}
                for i, k, ch in pending:
                    if i not in records:
                        records[i] = RecordWatch(self, len(steps_of[i]), results[i].chains, self._events_of(i),
                                                 stop=c.stop_at_first_error, key=i)
                    records[i].reopen(k)
                    watch.add(records[i], k)
            outs = yield Round(prompts, params, watch)
            for (i, k, ch), out in zip(pending, outs):
                if out.error is not None:
                    ch.error = f"forcing round {round_ + 1}: {out.error}"
                    continue
                self._absorb(ch.turns[0], out.outputs[0])
            for i, rec in (records or {}).items():
                if rec.halted:
                    results[i].stopped_at = rec.decided

    def _wants_forcing(self, ch: Chain) -> bool:
        turn = ch.turns[0]
        c = self.config
        return (turn.finish_reason == "stop" and len(turn.token_ids) < c.budget_tokens
                and len(turn.token_ids) + 8 < c.max_tokens)  # room for the continuation and some more text

    def _final_verdicts(self, jobs, results) -> Any:  # a coroutine of Rounds
        """ThinkPRM: cut the stop, append the final question, read P(yes). Exact: P(yes) / (P(yes) + P(no)) at the
        next position (one token). Released: SGLang's select() over the re-tokenised text (_select_verdicts)."""
        pending = [(i, k, ch) for i, _, _ in jobs for k, ch in enumerate(results[i].chains)
                   if ch.error is None and results[i].stopped_at is None]
        for i, k, ch in pending:
            turn = ch.turns[0]
            self._append_text(turn, self.fmt.final_prefix, drop_stop=turn.finish_reason == "stop")
        if self.released:
            yield from self._select_verdicts(pending)
            for i, _, _ in jobs:  # thinkprm_api.py scores a chain whose request raised softmax([0, 1])[0]
                for ch in results[i].chains:
                    if ch.error is not None and ch.final is None:
                        ch.final = SGLANG_FAILED_SCORE
            return
        prompts, params = [], []
        for i, k, ch in pending:
            turn = ch.turns[0]
            prompts.append(turn.prompt_ids + turn.token_ids)
            params.append(self.params(1, 1, None, logprob_ids=self.final_ids, greedy=True))
        outs = (yield Round(prompts, params)) if pending else []
        for (i, k, ch), out in zip(pending, outs):
            if out.error is not None:
                ch.error = f"final verdict: {out.error}"
                continue
            o = out.outputs[0]
            turn = ch.turns[0]
            turn.token_ids.extend(o.token_ids)
            turn.token_logprobs.extend({} for _ in o.token_ids)  # not a step verdict
            lps = o.token_logprobs[0] if o.token_logprobs else None
            if lps and all(t in lps for t in self.final_ids):
                ch.final = verdict_probability(lps, *self.final_ids)

    def _select_verdicts(self, pending: list) -> Any:  # a coroutine of Rounds
        """SGLang's RuntimeEndpoint.select as thinkprm_api.py ran it (released_scoring.sglang_select_score): the
        state text s = prompt + chain + final question is tokenised as text, P = len(tokens(s)), and each label c
        is scored by the prompt log-probabilities of tokens(s + c) from max(P - 2, 0) on."""
        labels = self.fmt.final_labels
        prompts, params, meta = [], [], []
        for i, k, ch in pending:
            turn = ch.turns[0]
            state = self._texts[i] + self.tok.decode(turn.token_ids, skip_special_tokens=True)
            start = max(len(self.encode(state)) - 2, 0)
            for c in labels:
                ids = self.encode(state + c)
                prompts.append(ids)
                params.append(SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                             prompt_logprobs_start=max(start, 1)))
            meta.append((ch, state, start))
        outs = (yield Round(prompts, params)) if prompts else []
        for n, (ch, state, start) in enumerate(meta):
            choice_outs = outs[n * len(labels):(n + 1) * len(labels)]
            if any(o.error is not None for o in choice_outs):
                ch.error = "final verdict: " + next(o.error for o in choice_outs if o.error is not None)
                ch.final = SGLANG_FAILED_SCORE
                continue
            choices = []
            for ids, o in zip(prompts[n * len(labels):(n + 1) * len(labels)], choice_outs):
                pl = o.prompt_logprobs or []
                entries = []
                for j in range(start, len(ids)):
                    d = pl[j] if j < len(pl) else None
                    lp = d[ids[j]].logprob if d is not None and ids[j] in d else None
                    entries.append((lp, self.tok.decode([ids[j]])))
                choices.append(entries)
            ch.final = sglang_select_score(choices, state)

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
    def chain_scores(self, text: str, token_ids: list[int], token_logprobs: list, num_steps: int, finished: bool,
                     failed: bool = False) -> Any:
        """One chain's ChainScores from its decoded text and tokens (also what early exit reads mid-generation)."""
        if failed:  # a failed chain scores nothing
            return score_chain(self.fmt, parse_output(self.fmt, "", num_steps), None, use_verdict_text=False)
        parsed = parse_output(self.fmt, text, num_steps, finished=finished)
        return score_chain(self.fmt, parsed, Generated(token_ids, token_logprobs), verdict_ids=self.verdict_ids,
                           tokenizer=self.tok)

    def _score(self, res: VerificationResult, steps: list[str]) -> None:
        if not res.chains:
            return
        n = len(steps)
        for ch in res.chains:
            turn = ch.turns[0]
            finished = turn.finish_reason not in ("length", "error") and ch.error is None
            ch.scores = self.chain_scores(self.tok.decode(turn.token_ids), turn.token_ids, turn.token_logprobs, n,
                                          finished, failed=ch.error is not None)
            ch.scores.final = ch.final
        res.scores = aggregate([ch.scores for ch in res.chains], n, method=self.config.method,
                               threshold=self.config.threshold)

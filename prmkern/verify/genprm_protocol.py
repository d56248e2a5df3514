"""GenPRM's protocol as its released genprm_inference.py / prm_evaluate.py run it, through prmkern's engine.

Per paragraph p (from 1), for N judgements (Maj@N: `num_chains`) sharing one conversation:
1. prompt = the conversation (system, user turns, the earlier assistant turns in full) rendered without the
   generation prompt, a trailing EOS cut, then "<analyze>\\nLet's analyze the Paragraph p step by step: ";
   the N analyses are one request (`n=N`: one prefill), stopped at "</analyze>\\n" (kept).
2. "<verify>\\nLet's use python code to find any potential error:\\n```python\\n" is appended, then up to
   `max_code_rounds` (3) rounds stopped at "\\n```\\n" or "</output>\\n" (kept), each with max_tokens minus the
   assistant text's length. A round that does not end with "</output>\\n" has the last python block of the turn run
   in the sandbox and "[Code Output]\\n\\n```\\n{output}\\n```\\n" appended, where output is the stripped stdout,
   "Code execute Error: {Type}: {message}", "Code execute time out: Code execution timed out", or "Code format
   error: No code found.", as GenPRM's CodeExecutor writes them.
3. Out of rounds or tokens: the turn degrades to the analysis + "</analyze>\\n<output>\\n**Judgement**: $\\boxed" and
   20 more tokens. Scoring "released": a round that does not end with "</output>\\n" runs the code executor and the
   loop goes on, as genprm_inference.py L281-319 does (prmkern gives up after RELEASED_DEGRADED_TRIES verdict-only
   rounds and fails the record); "exact": the turn ends after one verdict-only round.
4. The score (_paragraph_score). Released: the release's get_reward_score on vLLM 0.7.1 V0's processed
   log-probabilities (released_scoring.py), the decision searched in the whole turn, 0.5 without a decision, the
   record failed where the release raises (decision token not in the final round). Exact:
   scoring.genprm_paragraph_score on the exact log-probabilities with what code printed masked out, a judgement
   without a decision unscored. The paragraph's score is the mean over the N judgements (Maj@N); the first
   judgement that did not fail becomes the conversation's assistant turn for the next paragraphs, as the release
   appends outputs[0].

Every round is submitted as the re-encoded text (as the release's text prompts are), so prefix caching serves
all but the new tail. Released: the N judgements of a solution share one session and run their code in judgement
order (judgement k's code waits until judgements 0..k-1 are done), as the release's one CodeExecutor per sample;
exact: each judgement k has its own persistent session. Any exception from code execution fails that judgement alone,
recorded on its chain (`Chain.error`, and the code run's entry); the job goes on.

With stop_at_first_error, a record's later paragraphs are not judged once a paragraph's Maj@N score is below the
threshold or missing (the earliest error is then decided, as a full run would decide it).

It does not: parse formats other than GenPRM's kind (per_paragraph), or score other protocols.
"""
from __future__ import annotations

import re
from typing import Any

from prmkern.textcheck import defuse_control_text
from prmkern.verify import released_prompts as R
from prmkern.verify.continuous import Round
from prmkern.verify.parsing import parse_output
from prmkern.verify.released_scoring import GENPRM_TOP_LOGPROBS, genprm_released_probability, vllm_v0_processed
from prmkern.verify.scoring import ChainScores, VerdictScore, aggregate, genprm_paragraph_score

__all__ = ["run_paragraphs", "code_output_text"]

DEGRADED_TOKENS = 20  # genprm_inference.py: the verdict-only round
# Released: the release repeats the verdict-only round until it ends with "</output>\n" (genprm_inference.py
# L281-319), without a bound; prmkern gives up after this many tries and drops the record, as the release drops a
# sample whose scoring raises.
RELEASED_DEGRADED_TRIES = 8


class _Dropped(Exception):
    """Released scoring: the release raises here (ValueError in get_reward_score) and drops the sample."""


def code_output_text(result: Any) -> str:
    """The string GenPRM's CodeExecutor (genprm_inference.py L35-64) would have produced for this sandbox result:
    the stripped stdout; "Code execute time out: {str(e)}" for a TimeoutError (the in-process interruption's
    included); "Code execute Error: {type(e).__name__}: {str(e)}" for any other exception, verbatim (multi-line
    messages and SyntaxError's "(<string>, line N)" kept), whatever was printed before it dropped. A snippet the
    sandbox had to kill reads as the release's time-out (wall clock, CPU) or MemoryError."""
    status = getattr(result, "status", None)
    exc = getattr(result, "exception", None)
    if exc:
        kind, name, text = exc
        if kind == "timeout":
            return R.GENPRM_TIMEOUT_TEMPLATE.format(error=text)
        return R.GENPRM_ERROR_TEMPLATE.format(type=name, error=text)
    if status == "ok":
        return (result.stdout or "").strip()
    if status in ("timeout", "cpu_limit"):
        return R.GENPRM_TIMEOUT_TEMPLATE.format(error=R.GENPRM_TIMEOUT_MESSAGE)
    if status == "memory_limit":
        return R.GENPRM_ERROR_TEMPLATE.format(type="MemoryError", error="")
    lines = [ln for ln in (getattr(result, "stderr", "") or "").strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    m = re.match(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$", last)
    if m and (m.group(1).endswith(("Error", "Exception", "Exit", "Interrupt", "Warning")) or m.group(2) is not None):
        return R.GENPRM_ERROR_TEMPLATE.format(type=m.group(1).rsplit(".", 1)[-1], error=m.group(2) or "")
    return R.GENPRM_ERROR_TEMPLATE.format(type="RuntimeError", error=f"sandbox status {status}")


def _last_code(text: str, regex: str | None) -> str | None:
    """The last python block, stripped (GenPRM's CodeExecutor); the format's code_regex (group "code" or 1)."""
    matches = list(re.finditer(regex or R.GENPRM_CODE_REGEX, text, re.DOTALL))
    if not matches:
        return None
    m = matches[-1]
    return m.group("code" if "code" in m.re.groupindex else 1).strip()


def _masked(text: str, spans: list[tuple[int, int]]) -> str:
    chars = list(text)
    for a, b in spans:
        chars[a:b] = " " * (b - a)
    return "".join(chars)


class _Judgement:
    """One of the N judgements of one paragraph: the assistant turn's text and its final round."""

    def __init__(self, opener: str) -> None:
        self.text = opener
        self.analysis = ""  # stage 1's output (with "</analyze>\n")
        self.masks: list[tuple[int, int]] = []
        self.rounds = 0
        self.final_ids: list[int] = []
        self.final_logprobs: list[dict[int, float]] = []
        self.final_top: list[dict[int, float]] = []  # released: the raw top log-probabilities of the final round
        self.pending: str | None = None  # released: code waiting for the earlier judgements of its record
        self.degraded = 0  # verdict-only rounds run
        self.gave_up = False  # released: no "</output>\n" after RELEASED_DEGRADED_TRIES verdict-only rounds
        self.done = False
        self.error: str | None = None
        self.finish_reason: str | None = None


def run_paragraphs(v: Any, jobs: list, results: Any, *, history: dict[Any, list[str]] | None = None,
                   start: dict[Any, int] | None = None, runner: Any = None,
                   seed_index: dict[Any, int] | None = None) -> Any:
    """v: the Verifier (tokenizer, format, config); fills results[i].chains and .scores. A coroutine: yields each
    round's continuous.Round and gets its outputs back (Verifier.protocol).

    Verification sessions (sessions.py) resume records: `history[i]` holds the assistant turns of paragraphs
    0..start[i]-1 (updated in place), results[i].chains their turns, `runner` the sessions' code runner (whose
    per-judgement namespaces outlive this call) and seed_index[i] the record index whose seeds key i uses;
    paragraphs from start[i] on are run, then every paragraph scored."""
    start = start or {}
    seed_index = seed_index or {}
    from prmkern.verify.protocols import Chain, Turn
    c, fmt, tok = v.config, v.fmt, v.tok
    n, released = c.num_chains, v.released
    # Released: one namespace per solution, the N judgements run one after another in it (the release's one
    # CodeExecutor per sample, prm_evaluate.py); exact: one per judgement.
    key_of = (lambda i, k: i) if released else (lambda i, k: (i, k))
    top_n = max(GENPRM_TOP_LOGPROBS, c.top_k) if released else None
    runner, pool = runner or c.code_runner, None
    if runner is None:
        from prmkern.sandbox import SessionPool
        pool = SessionPool(c.code_limits)
        runner = pool.run_many
    try:
        if history is None:
            history = {i: [] for i, _, _ in jobs}
        for i, _, _ in jobs:
            if not results[i].chains:
                results[i].chains = [Chain() for _ in range(n)]
        max_steps = max((len(steps) for _, _, steps in jobs), default=0)
        for p in range(min((start.get(i, 0) for i, _, _ in jobs), default=0), max_steps):
            live = [(i, prob, steps) for i, prob, steps in jobs
                    if start.get(i, 0) <= p < len(steps) and results[i].error is None
                    and results[i].stopped_at is None]
            if not live:
                continue
            prompt_text = {i: fmt.render(prob, steps, tok, paragraph=p, history=history[i]) for i, prob, steps in live}
            opener = fmt.prefix(p)
            base = {i: t[:len(t) - len(opener)] if opener else t for i, t in prompt_text.items()}
            judged: dict[int, list[_Judgement]] = {i: [_Judgement(opener) for _ in range(n)] for i, _, _ in live}
            # Stage 1: the N analyses of each record in one request.
            outs = yield Round([v.encode(prompt_text[i]) for i, _, _ in live],
                               [v.params(n, c.max_tokens, v.seed(seed_index.get(i, i), p, 0), stop=fmt.analyze_stop,
                                         include_stop=True) for i, _, _ in live])
            for (i, _, _), out in zip(live, outs):
                for k, j in enumerate(judged[i]):
                    if out.error is not None:
                        j.error, j.done = f"paragraph {p + 1} analysis: {out.error}", True
                        continue
                    j.analysis = out.outputs[k].text
                    j.text += j.analysis + fmt.verify_prefix
            # Stage 2: verify / output rounds with code execution, all open judgements batched per round.
            while True:
                while released:  # the pending code of each record's first open judgement, in judgement order
                    ready = []
                    for i, _, _ in live:
                        k, j = next(((k, j) for k, j in enumerate(judged[i]) if not j.done), (None, None))
                        if j is not None and j.pending is not None:
                            ready.append((i, (i, k), j.pending, j))
                            j.pending = None
                    if not ready:
                        break
                    _run_code(runner, ready, fmt, results, p, v.control_words)
                active = [(i, k, j) for i, _, _ in live for k, j in enumerate(judged[i])
                          if not j.done and j.pending is None]
                if not active:
                    break
                prompts, params, degraded = [], [], []
                for i, k, j in active:
                    left = c.max_tokens - len(tok.tokenize(j.text))
                    deg = not (left > 0 and j.rounds < c.max_code_rounds)
                    if deg:
                        j.text = (opener + j.analysis.split("</analyze>")[0] + "</analyze>\n" + fmt.output_prefix)
                        j.masks = []
                        j.degraded += 1
                    degraded.append(deg)
                    stop = fmt.stop if deg else fmt.code_stop
                    prompts.append(v.encode(base[i] + j.text))
                    params.append(v.params(1, DEGRADED_TOKENS if deg else left,
                                           v.seed(seed_index.get(i, i), k, p, j.rounds + 1), stop=stop,
                                           include_stop=True, logprob_ids=v.verdict_ids, top_logprobs=top_n))
                outs = yield Round(prompts, params)
                to_run: list = []
                for (i, k, j), deg, out in zip(active, degraded, outs):
                    j.rounds += 1
                    if out.error is not None:
                        j.error, j.done = f"paragraph {p + 1} round {j.rounds}: {out.error}", True
                        continue
                    o = out.outputs[0]
                    j.text += o.text
                    j.final_ids, j.final_logprobs = list(o.token_ids), list(o.token_logprobs or [])
                    j.final_top = [{t: lp.logprob for t, lp in d.items()} for d in (o.logprobs or [])]
                    j.finish_reason = o.finish_reason
                    if o.text.endswith(fmt.stop[0]):
                        j.done = True
                        continue
                    if deg and not released:  # exact: one verdict-only round
                        j.done = True
                        continue
                    if deg and j.degraded >= RELEASED_DEGRADED_TRIES:
                        j.done, j.gave_up = True, True
                        continue
                    # Released, after a verdict-only round too: the code runs and the loop goes on, as released.
                    code = _last_code(j.text, fmt.code_regex)
                    if code is None:
                        _append_output(j, R.GENPRM_NO_CODE, fmt)
                    elif released:
                        j.pending = code
                    else:
                        to_run.append((key_of(i, k), (i, k), code, j))
                if to_run:
                    _run_code(runner, to_run, fmt, results, p, v.control_words)
            # Scores and the conversation's next assistant turn.
            for i, _, steps in live:
                src = next((j for j in judged[i] if j.error is None), None)
                if src is None:
                    results[i].error = f"paragraph {p + 1}: every judgement failed ({judged[i][0].error})"
                    continue
                history[i].append(src.text)
                for k, j in enumerate(judged[i]):
                    ch = results[i].chains[k]
                    try:
                        score, source = _paragraph_score(v, j)
                    except _Dropped as e:
                        results[i].error = f"paragraph {p + 1}, judgement {k + 1}: {e}"
                        score, source = None, str(e)
                    ch.turns.append(Turn(prompt_ids=[], token_ids=j.final_ids, token_logprobs=j.final_logprobs,
                                         finish_reason="error" if j.error else j.finish_reason, done=True,
                                         text=j.text, masks=list(j.masks), score=score, score_source=source))
                    if j.error and ch.error is None:
                        ch.error = j.error
                if c.stop_at_first_error and results[i].error is None and _paragraph_settles(results[i], p,
                                                                                             c.threshold):
                    results[i].stopped_at = p  # below the threshold, or unscored: later paragraphs change nothing
        for i, _, steps in jobs:
            if results[i].error is None:
                _score(v, results[i], len(steps))
    finally:
        if pool is not None:
            pool.close_all()


def _paragraph_settles(res: Any, p: int, threshold: float) -> bool:
    """Stop at the first error: whether paragraph p's Maj@N score, the mean of its judgements' scores as _score
    aggregates them (failed judgements and unscored ones left out), is below the threshold or missing."""
    vals = [ch.turns[p].score for ch in res.chains if len(ch.turns) > p and ch.turns[p].finish_reason != "error"
            and ch.turns[p].score is not None]
    return not vals or sum(vals) / len(vals) < threshold


def _paragraph_score(v: Any, j: _Judgement) -> tuple[float | None, str]:
    """(score, source) of one judgement. Released: the release's get_reward_score on vLLM 0.7.1's processed
    log-probabilities, 0.5 without a decision, _Dropped where it raises; exact: the exact P(Yes) / (P(Yes) + P(No))
    with printed code output masked, and no score (None) without a decision."""
    if j.error:
        return None, "judgement failed"
    c, fmt = v.config, v.fmt
    yes_id, no_id = v.verdict_ids
    regex = fmt.decision_regex or R.GENPRM_DECISION_REGEX
    if not v.released:
        score, source = genprm_paragraph_score(_masked(j.text, j.masks), j.final_ids, j.final_logprobs, yes_id,
                                               no_id, regex)
        if source == "no_decision":
            return None, "no decision: the judgement did not reach its verdict"
        return score, source
    if j.gave_up:
        raise _Dropped(f"the verdict round did not end with {fmt.stop[0]!r} after {RELEASED_DEGRADED_TRIES} tries "
                       f"(the release retries it without end)")
    m = re.search(regex, j.text, re.IGNORECASE)  # the release searches the whole turn, code output included
    if m is None:
        return 0.5, "no_decision"
    target = yes_id if m.group(1).capitalize() == "Yes" else no_id
    if target not in j.final_ids:
        raise _Dropped("the decision token is not in the final round: the release raises ValueError there and "
                       "drops the sample")
    idx = len(j.final_ids) - 1 - j.final_ids[::-1].index(target)
    if idx >= len(j.final_top) or idx >= len(j.final_logprobs) or not all(
            t in j.final_logprobs[idx] for t in (yes_id, no_id)):
        return None, "no log-probabilities at the decision token"
    top, chosen = j.final_top[idx], j.final_logprobs[idx]
    processed = vllm_v0_processed(top, chosen, c.temperature, c.top_k, c.top_p)
    listed = sorted(top, key=lambda t: -top[t])[:GENPRM_TOP_LOGPROBS]
    return genprm_released_probability(processed, listed, target, yes_id, no_id), "released"


def _append_output(j: _Judgement, output: str, fmt: Any) -> None:
    block = fmt.code_output_template.format(output=output)
    start = len(j.text) + block.index(output) if output else len(j.text)
    j.text += block
    if output:
        j.masks.append((start, start + len(output)))


def _run_code(runner: Any, to_run: list, fmt: Any, results: list, p: int,
              control_words: tuple[str, ...] = ()) -> None:
    """Runs the code of every judgement of the round; any exception fails that judgement alone. What the code
    printed cannot become control tokens in the next round's prompt or later paragraphs' history (textcheck).
    to_run: (session key, (record, judgement), code, judgement)."""
    try:
        res = list(runner([(key, code) for key, _, code, _ in to_run]))
        if len(res) != len(to_run):
            raise RuntimeError(f"the code runner returned {len(res)} results for {len(to_run)} snippets")
    except Exception:  # a batch failure: retry one by one so only the failing snippets fail
        res = []
        for key, _, code, _ in to_run:
            try:
                res.append(list(runner([(key, code)]))[0])
            except Exception as e:  # noqa: BLE001: any sandbox failure is this judgement's failure
                res.append(e)
    for (_, (i, k), code, j), r in zip(to_run, res):
        entry = {"paragraph": p, "code": code}
        if isinstance(r, BaseException):
            j.error, j.done = f"paragraph {p + 1}: code execution failed: {type(r).__name__}: {r}", True
            entry.update(status="exception", output=f"{type(r).__name__}: {r}")
        else:
            try:
                out = defuse_control_text(code_output_text(r), control_words)
            except Exception as e:  # noqa: BLE001: a malformed result fails this judgement only
                j.error, j.done = f"paragraph {p + 1}: unreadable sandbox result: {e}", True
                entry.update(status="exception", output=str(e))
                results[i].chains[k].code_runs.append(entry)
                continue
            entry.update(status=getattr(r, "status", None), output=out[:2000])
            _append_output(j, out, fmt)
        results[i].chains[k].code_runs.append(entry)


def _score(v: Any, res: Any, n: int) -> None:
    fmt = v.fmt
    per_chain = []
    for ch in res.chains:
        texts = [t.text if v.released else _masked(t.text, t.masks) for t in ch.turns]
        finished = [t.finish_reason not in ("length", "error") for t in ch.turns]
        parsed = parse_output(fmt, texts, n, finished=finished)
        steps = []
        for p, sv in enumerate(parsed.steps):
            if p >= len(ch.turns) or ch.turns[p].finish_reason == "error":
                steps.append(VerdictScore(p, sv.status, None, "none", note="judgement failed or not reached"))
                continue
            t = ch.turns[p]
            steps.append(VerdictScore(p, sv.status, t.score, t.score_source if t.score is not None else "none",
                                      note=None if t.score is not None else t.score_source))
        ch.scores = ChainScores(steps, parsed)
        per_chain.append(ch.scores)
    res.scores = aggregate(per_chain, n, method=v.config.method, threshold=v.config.threshold)

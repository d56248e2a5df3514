"""Test-time search with a verifier in the loop: best-of-N and step-level beam search.

The generator and the verifier are prmkern LLMs; they may be one object (one checkpoint serving both roles, one KV
pool, one prefix cache). Best-of-N samples N solutions per problem in one request (the problem's prompt is
prefilled once), verifies all of them in one batch, and picks by verifier score or by a verifier-weighted majority
vote over equivalent final answers (prmkern.verify.grading decides equivalence). Beam search grows solutions one step at a
time, keeping the `beam_width` partial solutions the verifier scores highest.
It does not train or grade against references beyond reporting `correct` when a reference answer is given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from prmkern.verify.grading import extract_answer, is_equivalent
from prmkern.sampling_params import SamplingParams, derive_seed
from prmkern.verify.formats import render_messages
from prmkern.verify.protocols import Verifier
from prmkern.verify.results import check_text

SOLVE_INSTRUCTION = ("Solve the problem step by step. Separate the steps with a blank line and put the final answer "
                     "in \\boxed{{}}.\n\n{problem}")
STEP_DELIMITER = "\n\n"


def split_steps(text: str, delimiter: str = STEP_DELIMITER) -> list[str]:
    steps = [s.strip() for s in text.split(delimiter)]
    return [s for s in steps if s]


def solver_prompt(tokenizer: Any, problem: str) -> list[int]:
    text = render_messages([{"role": "user", "content": SOLVE_INSTRUCTION.format(problem=problem)}], tokenizer)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Candidate:
    text: str
    steps: list[str]
    answer: str | None
    score: float | None  # verifier solution score
    step_scores: list[float | None] = field(default_factory=list)
    # prune: verification stopped at its decided error (score and step_scores cover the steps judged until then)
    pruned: bool = False
    earliest_error: int | None = None
    error: str | None = None  # why it has no score: its verification failed (e.g. its verifier prompt is too long)


@dataclass
class SearchResult:
    problem: str
    chosen: Candidate | None
    candidates: list[Candidate]
    correct: bool | None = None  # against the reference answer, when one was given
    seconds: float = 0.0
    pruned: int = 0  # candidates (beam search: proposals) whose verification was dropped (prune)
    # why this problem has no usable result (its solutions could not be generated, or none could be verified);
    # None when it has one
    error: str | None = None
    # how the choice was made when not as `select` asked (select='vote' with no final answer to count: the highest
    # verifier score instead); None otherwise
    note: str | None = None


VOTE_FALLBACK = ("select='vote' had no answers to count (no candidate has a final answer: \\boxed{...} or 'The "
                 "answer is ...'); chosen by the highest verifier score instead, as select='score'")


def _check_problem(problem: Any, where: str) -> None:
    """ValueError / TypeError naming `where` unless `problem` is a non-empty str that UTF-8 can encode."""
    if not isinstance(problem, str):
        raise TypeError(f"{where} must be a str; got {type(problem).__name__}")
    if not problem.strip():
        raise ValueError(f"{where} is empty; accepted: the problem's text")
    check_text(problem, where)


def _failure(result: Any) -> str | None:
    """Why a verification result has no score: the record's own error, else its first chain's (a verifier prompt
    past the context fails each chain, not the record)."""
    if result.error is not None:
        return result.error
    return next((c.error for c in getattr(result, "chains", []) if getattr(c, "error", None)), None)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= 1")


def weighted_vote(candidates: Sequence[Candidate]) -> Candidate | None:
    """The candidate whose final answer collects the most verifier score over equivalent answers."""
    groups: list[tuple[str, float, Candidate]] = []  # (answer, total weight, best candidate)
    for c in candidates:
        if c.answer is None:
            continue
        w = c.score if c.score is not None else 0.0
        for j, (ans, total, best) in enumerate(groups):
            if is_equivalent(c.answer, ans):
                groups[j] = (ans, total + w, best if (best.score or 0.0) >= (c.score or 0.0) else c)
                break
        else:
            groups.append((c.answer, w, c))
    if not groups:
        return None
    return max(groups, key=lambda g: g[1])[2]


def best_of_n(generator: Any, verifier: Verifier, problems: Sequence[dict[str, Any]], n: int = 8,
              params: SamplingParams | None = None, select: str = "score", sessions: bool = False,
              prune: bool | str = False) -> list[SearchResult]:
    """problems: dicts with 'problem' and optionally 'answer' (the reference). select: 'score' | 'vote'; when no
    candidate of a problem has a final answer, 'vote' has nothing to count and chooses as 'score' does, saying so in
    the result's `note` (VOTE_FALLBACK).

    A candidate whose verification fails (its verifier prompt past the engine's context: a very long problem or
    candidate) gets no score and its reason in `Candidate.error`; a problem none of whose candidates could be
    verified gets it in `SearchResult.error`; every other candidate and problem of the batch is unaffected, with or
    without sessions.

    prune (select 'score', method 'min'; docs/early_exit.md#pruning-the-search):
    * without sessions, on streamed verdicts (pruning.py): all candidates are verified in one continuous batch and a
      candidate whose earliest error is decided is dropped (chains aborted, blocks freed) by the rule: True or
      'exact' once a sibling is known to score strictly above it (the choice is provably the unpruned one);
      'error' at once. Selection is the highest score among the candidates not dropped; when every scored
      candidate was dropped ('error' only), the one whose decided error comes latest, ties by the higher score
      over its judged steps, then the first. With 'error' the choice equals the unpruned one whenever the
      unpruned choice scores at or above the threshold (every dropped candidate scores below it).
    * sessions: the candidates are verified step by step in verification sessions (all candidates' step d in one
      engine batch); prune (True) stops a candidate once its running minimum is below the best finished
      candidate's score (a minimum only falls, so it cannot win; its reported score is then that running minimum,
      an upper bound, and the candidate is marked `pruned` as without sessions)."""
    if isinstance(problems, (str, dict)) or not isinstance(problems, Sequence):
        raise TypeError(f"problems must be a list of {{'problem': str[, 'answer': str]}} dicts; got "
                        f"{type(problems).__name__}")
    for i, p in enumerate(problems):
        if not isinstance(p, dict) or "problem" not in p:
            raise TypeError(f"problems[{i}] must be a dict with 'problem' (str); got "
                            f"{sorted(p) if isinstance(p, dict) else type(p).__name__}")
        _check_problem(p["problem"], f"problems[{i}]['problem']")
    _check_count("n", n)
    if select not in ("score", "vote"):
        raise ValueError(f"select={select!r} is invalid; accepted: 'score' (highest verifier score) or 'vote' "
                         f"(verifier-weighted majority over equivalent answers)")
    if prune and select != "score":
        raise ValueError(f"prune applies to select='score' only: a weighted vote sums the scores of every "
                         f"candidate, so dropping one can change the vote; got select={select!r}")
    if prune and sessions and not (prune is True and verifier.config.method == "min"):
        raise ValueError("prune with sessions=True needs prune=True and the verifier's method 'min' (a running "
                         f"minimum only falls); got prune={prune!r}, method={verifier.config.method!r}")
    rule = None
    if prune and not sessions:
        from prmkern.verify.pruning import check_prune
        rule = check_prune(prune, verifier.for_best_of_n().config)
    start = time.perf_counter()
    tok = generator.tokenizer
    base = params or SamplingParams(temperature=0.8, top_p=0.95, max_tokens=1024)
    gen_params = SamplingParams(**{**{k: getattr(base, k) for k in ("temperature", "top_p", "top_k", "max_tokens",
                                                                    "seed", "stop", "min_tokens")}, "n": n})
    outs = generator.generate([solver_prompt(tok, p["problem"]) for p in problems], gen_params, use_tqdm=False)
    verifier = verifier.for_best_of_n()  # released ThinkPRM: its best-of-N wording (no "Step i:" labels)
    records, owners = [], []
    results = [SearchResult(p["problem"], None, []) for p in problems]
    for i, (prob, out) in enumerate(zip(problems, outs)):
        if out.error is not None:  # this problem's solutions could not be generated (a prompt past the context)
            results[i].error = f"generating its solutions failed: {out.error}"
            continue
        for c in out.outputs:
            steps = verifier.best_of_n_steps(c.text) or split_steps(c.text) or [c.text.strip() or "(empty)"]
            records.append({"id": f"{i}:{c.index}", "problem": prob["problem"], "steps": steps})
            owners.append((i, c.text))
    dropped = [False] * len(records)
    if sessions:
        verdicts, dropped = _verify_in_sessions(verifier, records, [i for i, _ in owners], bool(prune))
    elif rule is not None:
        from prmkern.verify.pruning import verify_pruned
        run = verify_pruned(verifier, records, [i for i, _ in owners], rule, keep=1)
        verdicts, dropped = run.results, run.dropped
    else:
        verdicts = verifier.verify(records)
    failed: dict[int, str] = {}
    for (i, text), rec, v, cut in zip(owners, records, verdicts, dropped):
        why = _failure(v) if v is not None else None
        if why is not None:
            failed.setdefault(i, why)
        scores = v.scores if v is not None else None
        score = scores.score if scores else None
        results[i].candidates.append(Candidate(
            text, rec["steps"], extract_answer(text), score, [s.score for s in scores.steps] if scores else [],
            pruned=cut, earliest_error=scores.earliest_error if scores else None,
            error=f"verifying this candidate failed: {why}" if score is None and why is not None else None))
        results[i].pruned += cut
    for i, (prob, res) in enumerate(zip(problems, results)):
        if res.error is None and res.candidates and all(c.score is None for c in res.candidates) and i in failed:
            res.error = f"no candidate could be verified: {failed[i]}"
        if select == "vote":
            res.chosen = weighted_vote(res.candidates)
            if res.chosen is None and res.candidates:  # no answer to count: the highest score, said in `note`
                res.chosen, res.note = select_by_score(res.candidates), VOTE_FALLBACK
        else:
            res.chosen = select_by_score(res.candidates)
        if prob.get("answer") is not None:
            res.correct = bool(res.chosen and res.chosen.answer is not None and
                               is_equivalent(res.chosen.answer, str(prob["answer"])))
        res.seconds = time.perf_counter() - start
    return results


def select_by_score(candidates: Sequence[Candidate]) -> Candidate | None:
    """The highest score among the candidates not pruned (the first of equals); when every scored candidate was
    pruned, the one whose decided error comes latest, then the higher score over its judged steps; when none is
    scored, the first."""
    scored = [c for c in candidates if c.score is not None and not c.pruned]
    if scored:
        return max(scored, key=lambda c: c.score)
    cut = [c for c in candidates if c.pruned]
    if cut:
        return max(cut, key=lambda c: (c.earliest_error if c.earliest_error is not None else -1, c.score or 0.0))
    return (list(candidates) or [None])[0]


def _verify_in_sessions(verifier: Verifier, records: list[dict[str, Any]], groups: list[Any],
                        prune: bool) -> tuple[list[Any], list[bool]]:
    """verify() of whole solutions, run as one session per record fed step by step (each step d of every record in
    one batch): the results, and which records prune stopped. With prune, the records of one group (groups[i]: its
    problem) stop once they cannot beat the best finished one. A record whose step fails in the engine (its verifier
    prompt past the context) fails alone, its reason in its result's `error` (verify() puts it on its chains)."""
    opened = [verifier.open(r["problem"], index=i) for i, r in enumerate(records)]
    live = list(range(len(records)))
    stopped = [False] * len(records)
    depth = 0
    try:
        while live:
            added = verifier.sessions.add_steps([(opened[i], records[i]["steps"][depth]) for i in live])
            depth += 1
            live = [i for i, v in zip(live, added) if v.error is None and depth < len(records[i]["steps"])]
            if prune:
                best: dict[Any, float] = {}
                for i, r in enumerate(records):
                    s = opened[i]
                    score = s.scores.score if s.scores and s.error is None else None
                    if len(s.steps) == len(r["steps"]) and score is not None:
                        best[groups[i]] = max(best.get(groups[i], score), score)
                keep = [i for i in live if opened[i].scores.score is None
                        or opened[i].scores.score >= best.get(groups[i], -1.0)]
                for i in set(live) - set(keep):
                    stopped[i] = True
                live = keep
        return [s.result() for s in opened], stopped
    finally:
        for s in opened:
            s.close()


def beam_search(generator: Any, verifier: Verifier, problem: str, beam_width: int = 4, expand: int = 4,
                max_steps: int = 8, step_tokens: int = 256, temperature: float = 0.8,
                seed: int | None = 0, sessions: bool = False, prune: bool = False) -> SearchResult:
    """Step-level beam search: each beam proposes `expand` next steps (generation stops at a blank line), the
    verifier scores every partial solution, and the best `beam_width` survive. A beam is complete once its text
    holds a boxed answer or the generator ends it.

    sessions: each beam holds a verification session; a proposal forks its beam's session and adds only its own
    step (all proposals of a depth in one engine batch), instead of verifying the partial solution from its first
    step again.

    prune (method 'min', sessions=False; pruning.py's 'exact' rule): a depth's proposals are verified in one
    continuous batch on streamed verdicts, and an unfinished proposal whose earliest error is decided is dropped
    (chains aborted, blocks freed) once beam_width other unfinished proposals are known to score strictly above it,
    so it could not have entered the beam: the beams, candidates and choice are those of the unpruned search.
    Finished proposals (candidates) are never dropped."""
    _check_problem(problem, "problem")
    for name, value in (("beam_width", beam_width), ("expand", expand), ("max_steps", max_steps),
                        ("step_tokens", step_tokens)):
        _check_count(name, value)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} is invalid; accepted: an int or None")
    if prune is not False and prune is not True:
        raise ValueError(f"beam search prune={prune!r} is invalid; accepted: True (drop a proposal that cannot enter "
                         f"the beam) or False")
    if prune:
        if sessions:
            raise ValueError("beam search prune=True runs on streamed whole-solution verdicts (sessions=False); "
                             "sessions are not pruned (a session's step round ends at that step's verdict); use "
                             "sessions=False or prune=False")
        from prmkern.verify.pruning import check_prune
        check_prune(True, verifier.config)
    start = time.perf_counter()
    tok = generator.tokenizer
    prompt = solver_prompt(tok, problem)
    # (generated ids, steps, score, verification session or None)
    beams: list[tuple[list[int], list[str], float, Any]] = [([], [], 1.0, verifier.open(problem) if sessions
                                                              else None)]
    done: list[Candidate] = []
    dropped, failed = [0], []  # failed: why proposals could not be generated or verified
    try:
        _beam_loop(generator, verifier, problem, prompt, beams, done, beam_width, expand, max_steps, step_tokens,
                   temperature, seed, dropped if prune else None, failed)
    finally:
        for *_, session in beams:
            if session is not None:
                session.close()
    for ids, steps, score, _ in beams:  # unfinished beams still count as candidates
        text = tok.decode(ids, skip_special_tokens=True)
        done.append(Candidate(text, steps, extract_answer(text), score))
    scored = [c for c in done if c.score is not None]  # an unscored candidate (its verification failed) is last
    chosen = max(scored, key=lambda c: c.score) if scored else (done[0] if done else None)
    error = None if scored or not failed else failed[0]
    return SearchResult(problem, chosen, done, seconds=time.perf_counter() - start, pruned=dropped[0], error=error)


def _beam_loop(generator: Any, verifier: Verifier, problem: str, prompt: list[int], beams: list, done: list,
               beam_width: int, expand: int, max_steps: int, step_tokens: int, temperature: float,
               seed: int | None, dropped: list[int] | None = None, failed: list[str] | None = None) -> None:
    """Grows `beams` in place (closing the sessions of the partial solutions that drop out). dropped: [count] to
    prune (beam_search's prune), counting the proposals dropped. failed: gets why generations or verifications
    failed (a beam whose generation fails proposes nothing; a proposal whose verification fails scores None and
    ranks last)."""
    failed = failed if failed is not None else []
    tok = generator.tokenizer
    for depth in range(max_steps):
        params = [SamplingParams(n=expand, temperature=temperature, max_tokens=step_tokens, stop=[STEP_DELIMITER],
                                 include_stop_str_in_output=True,
                                 seed=None if seed is None else derive_seed(seed, depth, b))
                  for b in range(len(beams))]  # each beam its own seed: equal beams must not propose alike
        outs = generator.generate([prompt + ids for ids, _, _, _ in beams], params, use_tqdm=False)
        proposals = []
        for (ids, steps, _, session), out in zip(beams, outs):
            if out.error is not None:
                failed.append(f"generating a step failed: {out.error}")
                continue
            for c in out.outputs:
                step = c.text.strip()
                if not step:
                    continue
                proposals.append((ids + c.token_ids, steps + [step], c.finish_reason != "stop" or
                                  c.stop_reason != STEP_DELIMITER or extract_answer(step) is not None,
                                  session.fork() if session is not None else None))
        for *_, session in beams:  # the proposals hold what the beams had
            if session is not None:
                session.close()
        beams.clear()
        if not proposals:
            break
        if proposals[0][3] is not None:
            added = verifier.sessions.add_steps([(p[3], p[1][-1]) for p in proposals])
            verdicts = [p[3].result() for p in proposals]
            assert len(added) == len(verdicts)
        elif dropped is not None:
            from prmkern.verify.pruning import verify_pruned
            run = verify_pruned(verifier, [{"problem": problem, "steps": s} for _, s, _, _ in proposals],
                                [0] * len(proposals), "exact", keep=beam_width,
                                competes=[not final for _, _, final, _ in proposals])
            keep = [not cut for cut in run.dropped]
            dropped[0] += len(proposals) - sum(keep)
            proposals = [p for p, k in zip(proposals, keep) if k]
            verdicts = [v for v, k in zip(run.results, keep) if k]
        else:
            verdicts = verifier.verify([{"problem": problem, "steps": s} for _, s, _, _ in proposals])
        scored = []
        for (ids, steps, final, session), v in zip(proposals, verdicts):
            score = v.scores.score if v.scores and v.scores.score is not None else None
            why = _failure(v)
            if score is None and why is not None:
                failed.append(f"verifying a proposal failed: {why}")
            if final:
                text = tok.decode(ids, skip_special_tokens=True)
                done.append(Candidate(text, steps, extract_answer(text), score,
                                      [s.score for s in v.scores.steps] if v.scores else [],
                                      error=f"verifying this candidate failed: {why}" if score is None and why
                                      else None))
                if session is not None:
                    session.close()
            elif session is None or session.error is None:  # a failed session step closed its session: no beam
                scored.append((ids, steps, score, session))
        scored.sort(key=lambda b: (b[2] is not None, b[2] or 0.0), reverse=True)  # unscored last
        for *_, session in scored[beam_width:]:
            if session is not None:
                session.close()
        beams.extend(scored[:beam_width])
        if not beams:
            break

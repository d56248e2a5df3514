"""How `verify` and `eval processbench` run their records on the engine: batch-synchronous groups (`verify_rows`,
what `--batch-size` groups ran before continuous batching, kept for the data-parallel path and for measurement)
and continuous batching across records (`verify_continuous`, the default), the progress bar's per-step counters
(`ChainProgress`), and the early-exit counters a job's --summary reports.

Seeds: record r samples as position r % batch_size of group r // batch_size with the group's seed, in both ways of
running, so a record's chains do not depend on what else runs, what ran before, or a resumed run's skips.
It does not read input, write rows or compute metrics (cli/verify.py, cli/jobs.py, cli/verify_metrics.py).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from prmkern.cli.jobs import Item
from prmkern.engine import driver
from prmkern.sampling_params import derive_seed
from prmkern.verify.continuous import ContinuousRunner
from prmkern.verify.protocols import VerificationResult, Verifier

__all__ = ["ChainProgress", "early_exit_counts", "verify_rows", "verify_continuous"]


class ChainProgress:
    """The LLM, as the Verifier sees it, with the progress bar's postfix counting generated tokens and finished chains
    at every engine step (redrawn at most 4 times a second): a batch of solutions ends all at once, and one long
    chain takes many seconds, so per-solution ticks alone would leave the bar still."""

    def __init__(self, llm: Any, bar: Any):
        self._llm, self._bar = llm, bar

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, prompts: list, params: Any = None, use_tqdm: bool | None = None, watch: Any = None) -> list:
        engine = getattr(self._llm, "engine", None)
        if params is not None and not isinstance(params, (list, tuple)) and isinstance(prompts, list):
            params = [params] * len(prompts)  # one SamplingParams for all prompts
        if self._bar is None or not isinstance(params, list) or not hasattr(engine, "add_request"):
            return self._llm.generate(prompts, params, use_tqdm=False, **({"watch": watch} if watch else {}))
        chains = sum(sp.n for sp in params)
        tokens0, shown, finished_chains = engine.stats.generated_tokens, [0.0], [0]

        def show() -> None:
            self._bar.set_postfix_str(f"{engine.stats.generated_tokens - tokens0} tokens, "
                                      f"{finished_chains[0]}/{chains} chains done")

        def on_step(finished: list) -> None:  # every engine step: tokens so far, chains finished (<= 4 redraws/s)
            finished_chains[0] += len(finished)
            now = time.monotonic()
            if now - shown[0] >= 0.25:
                shown[0] = now
                show()
        outs = driver.generate(engine, prompts, params, on_step, watch)
        show()  # the call's final count, whatever the redraw throttle skipped
        return outs

    def step_progress(self, chains: int) -> Callable[[list], None] | None:
        """The continuous runner's per-step callback: the bar's postfix counts generated tokens and finished chains
        of `chains` (redrawn at most 4 times a second); None without a bar."""
        engine = getattr(self._llm, "engine", None)
        if self._bar is None or engine is None:
            return None
        tokens0, shown, done = engine.stats.generated_tokens, [0.0], [0]

        def on_step(finished: list) -> None:
            done[0] += len(finished)
            now = time.monotonic()
            if now - shown[0] >= 0.25 or done[0] >= chains:
                shown[0] = now
                self._bar.set_postfix_str(f"{engine.stats.generated_tokens - tokens0} tokens, "
                                          f"{done[0]}/{chains} chains done")
        return on_step


def early_exit_counts(results: list, counts: dict[str, int], num_chains: int) -> None:
    """Adds what --stop-at-first-error did for these results to `counts` (the summary's `early_exit`)."""
    for res in results:
        if res.scores is None:
            continue
        tokens = sum(len(t.token_ids) for c in res.chains for t in c.turns)
        counts["solutions"] = counts.get("solutions", 0) + 1
        counts["generated_tokens"] = counts.get("generated_tokens", 0) + tokens
        if res.stopped_at is None:
            continue
        judged, left = res.stopped_at + 1, res.num_steps - res.stopped_at - 1
        counts["stopped"] = counts.get("stopped", 0) + 1
        counts["steps_not_judged"] = counts.get("steps_not_judged", 0) + left
        counts["chains_aborted"] = counts.get("chains_aborted", 0) + sum(
            1 for c in res.chains if c.turns and c.turns[-1].finish_reason == "abort")
        # the second wave of chains (Verifier.first_wave) that never ran: the first settled the answer
        counts["chains_not_started"] = counts.get("chains_not_started", 0) + max(0, num_chains - len(res.chains))
        # an estimate, not a measurement: this solution's tokens per judged step times the steps not judged, plus
        # its tokens per chain times the chains not started
        not_started = max(0, num_chains - len(res.chains))
        counts["estimated_tokens_saved"] = counts.get("estimated_tokens_saved", 0) + round(
            tokens * left / judged + tokens / max(1, len(res.chains)) * not_started)


def verify_rows(verifier: Any, batch: list[Item], emit: Callable, tokenizer: Any, no_chains: bool,
                batch_size: int, early: dict[str, int] | None = None,
                count: Callable[[int], None] | None = None) -> int:
    """Verifies a batch of records aligned to `batch_size` (all with index // batch_size == g); emits one row per
    record; returns the number of chains run. count(n): called with each record's chains as its row is emitted.

    Sampling must not depend on what else ran (or on what a resumed run skips): group g gets its own seed, and each
    record keeps its position in the group, the finished and the bad records' places held by None (the Verifier
    fails a None record at once, without the engine)."""
    group = batch[0].index // batch_size
    assert all(it.index // batch_size == group for it in batch), [it.index for it in batch]
    start = group * batch_size
    records: list[Any] = [None] * (max(it.index for it in batch) - start + 1)
    for it in batch:
        records[it.index - start] = it.record
    config = verifier.config
    if config.seed is not None:
        config = dataclasses.replace(config, seed=derive_seed(config.seed, group))
    results = Verifier(verifier.llm, config).verify(records)
    if early is not None:
        early_exit_counts([results[it.index - start] for it in batch], early, config.num_chains)
    chains = 0
    for it in batch:
        res = results[it.index - start]
        row = res.to_json(tokenizer, include_chains=not no_chains)
        row.pop("id", None)
        chains += len(res.chains)
        if count is not None:
            count(len(res.chains))
        emit(it.index, it.row(**row))
    return chains


def verify_continuous(verifier: Any, items: list[Item], emit: Callable, tokenizer: Any, no_chains: bool,
                      batch_size: int, early: dict[str, int] | None = None,
                      count: Callable[[int], None] | None = None) -> int:
    """Verifies `items` keeping the engine full across records (verify.continuous.ContinuousRunner): records are
    admitted while fewer than batch_size x K chains are in flight, and each record's row is emitted as soon as that
    record finishes (the JobRunner writes rows in input order: a row waits for the records before it). Returns the
    chains run. count(n): called with each record's chains as its row is emitted, so a caller interrupted in the
    middle of this one call (Ctrl-C) still knows the chains of the records that finished.

    Sampling is verify_rows': record r samples as position r % batch_size of group r // batch_size with the group's
    seed, so what a record samples does not depend on what else runs, what ran before, or a resumed run's skips."""
    llm = getattr(verifier.llm, "_llm", verifier.llm)  # ChainProgress: the runner steps the engine itself
    by_group: dict[int, Any] = {}
    chains = 0

    def verifier_of(group: int) -> Any:
        if group not in by_group:
            config = verifier.config
            if config.seed is not None:
                config = dataclasses.replace(config, seed=derive_seed(config.seed, group))
            by_group.clear()  # records arrive in index order: an earlier group's verifier is not needed again
            by_group[group] = Verifier(llm, config)
        return by_group[group]

    def start_of(it: Item) -> tuple[Any, Callable, Callable]:
        group, pos = divmod(it.index, batch_size)
        v = verifier_of(group)
        results: dict[int, VerificationResult] = {}

        def start() -> Any:
            problem, steps = v.prepare(it.record)
            results[pos] = VerificationResult(pos, len(steps), None, [], scoring=v.config.scoring)
            return v.protocol([(pos, problem, steps)], results)

        def done(error: BaseException | None) -> None:
            nonlocal chains
            res = results.get(pos) or VerificationResult(pos, 0, None, [], scoring=v.config.scoring)
            if error is not None:
                res.error = f"{type(error).__name__} while processing: {error}" if not isinstance(
                    error, ValueError) else str(error)
            elif early is not None:
                early_exit_counts([res], early, v.config.num_chains)
            row = res.to_json(tokenizer, include_chains=not no_chains)
            row.pop("id", None)
            chains += len(res.chains)
            if count is not None:
                count(len(res.chains))
            emit(it.index, it.row(**row))
        return it.index, start, done

    engine = llm.engine
    k = verifier.config.num_chains
    # a record's first round: K chains, or the adaptive count's first wave (its later waves join as they come)
    first = verifier.config.chains_min or k
    progress = getattr(verifier.llm, "step_progress", None)
    runner = ContinuousRunner(engine, max_chains=max(1, batch_size) * k, chains_per_record=first,
                              on_step=progress(k * len(items)) if progress else None)
    runner.run(start_of(it) for it in sorted(items, key=lambda it: it.index))
    return chains

"""VerifyConfig: every setting of a verification (format, chains, sampling, scoring, early exit, adaptive chain
count), checked when it is made, before any model work, with errors that name what was given and what is accepted.

None fields take the format's published defaults (formats.format_defaults), then the generic ones below. The
Verifier (protocols.py) runs what it describes; the command line, the server and the sessions build it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from prmkern.sampling_params import SamplingParams
from prmkern.sandbox import SandboxLimits
from prmkern.verify.formats import VerifierFormat, format_defaults, get_format
from prmkern.verify.released_scoring import check_scoring, default_scoring
from prmkern.verify.scoring import METHODS

__all__ = ["VerifyConfig"]


_GENERIC = dict(num_chains=8, temperature=0.6, top_p=0.95, top_k=-1, max_tokens=2048, method="min",
                max_code_rounds=3)


@dataclass
class VerifyConfig:
    """None fields take the format's published defaults (formats.format_defaults), then _GENERIC."""

    format: str | VerifierFormat = "thinkprm"
    num_chains: int | None = None  # K: parallel chains per record (GenPRM: N judgements per paragraph, Maj@N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None  # per chain, all rounds together (GenPRM: per paragraph turn)
    method: str | None = None  # solution score: min | last | mean | product | final | vote
    threshold: float = 0.5  # earliest error: first step whose score is below this
    seed: int | None = 0
    budget_tokens: int | None = None  # budget forcing: a chain may not end before this many generated tokens
    continuation: str | None = None  # None: the format's continuations, by round
    max_forcing_rounds: int = 4
    max_code_rounds: int | None = None  # GenPRM: generation rounds after the analysis (its time_limit, 3)
    # GenPRM: interrupted in-process at 5 s (the release's signal.alarm(5)); killed at 10 s wall or 8 s CPU (backstops)
    code_limits: SandboxLimits = field(
        default_factory=lambda: SandboxLimits(wall_time_s=10, cpu_time_s=8, interrupt_s=5))
    # GenPRM code execution: items [(chain key, code)] -> one sandbox result per item (default: a SessionPool).
    code_runner: Callable[[list[tuple[Any, str]]], list[Any]] | None = None
    # "released": the arithmetic and text handling of the engine the format's release ran on (SGLang's select for
    # ThinkPRM, vLLM 0.7.1 V0's processed log-probabilities for GenPRM; released_scoring.py); "exact": prmkern's
    # exact probabilities. None: "released" for the released formats, "exact" for the others.
    scoring: str | None = None
    # Stop judging a solution once its earliest error is decided (early_exit.py): its remaining chains are aborted
    # and its later steps are not judged; the prediction equals a full run's. Not for final / vote / critic.
    stop_at_first_error: bool = False
    # Adaptive chain count (adaptive.py): chains in waves from chains_min, doubling up to chains_max (num_chains), a
    # solution stopping once the risk that chains_max chains predict otherwise is at most chains_risk.
    chains_min: int | None = None
    chains_max: int | None = None  # None with chains_min: num_chains
    chains_risk: float = 0.05

    def __post_init__(self) -> None:
        self.format = get_format(self.format)
        from prmkern.verify.adaptive import check_risk
        check_risk(self.chains_risk)
        if self.chains_max is not None and self.chains_min is None:
            raise ValueError(f"chains_max={self.chains_max!r} needs chains_min (the first wave); accepted: both, "
                             f"or num_chains alone for a fixed count")
        if self.chains_min is not None:
            from prmkern.verify.adaptive import check_bounds
            check_bounds(self.chains_min, self.chains_max if self.chains_max is not None else self.num_chains,
                         self.chains_risk, "chains_max" if self.chains_max is not None else "num_chains")
            if self.chains_max is None:
                self.chains_max = self.num_chains
            elif self.num_chains is not None and self.num_chains != self.chains_max:
                raise ValueError(f"num_chains={self.num_chains!r} and chains_max={self.chains_max!r} disagree; "
                                 f"accepted: chains_max alone (it sets num_chains), or equal values")
            if self.chains_max is not None:
                self.num_chains = self.chains_max
        self.scoring = default_scoring(self.format.name) if self.scoring is None else check_scoring(self.scoring)
        defaults = {**_GENERIC, **format_defaults(self.format)}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if isinstance(self.num_chains, bool) or not isinstance(self.num_chains, int) or self.num_chains < 1:
            raise ValueError(f"num_chains={self.num_chains!r} is invalid; accepted: an int >= 1")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid; accepted: an int >= 1")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid; accepted: {METHODS}")
        if self.method == "final" and not self.format.final_prefix:
            raise ValueError(f"method 'final' needs a format with a forced final verdict (final_prefix); "
                             f"{self.format.name!r} has none")
        # The sampling settings fail here, before any model work, with SamplingParams' own messages.
        SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       max_tokens=self.max_tokens)
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} is invalid; accepted: a float in [0, 1]")
        if not isinstance(self.stop_at_first_error, bool):
            raise ValueError(f"stop_at_first_error={self.stop_at_first_error!r} is invalid; accepted: True or False")
        if self.stop_at_first_error:
            from prmkern.verify.early_exit import check_applies
            check_applies(self.format, self.method)
        if self.chains_min is not None:
            from prmkern.verify.adaptive import check_adaptive, check_bounds
            check_bounds(self.chains_min, self.num_chains, self.chains_risk, *(
                ("chains_max", "") if self.chains_max is not None else ("num_chains", " (the format's default)")))
            self.chains_max = self.num_chains
            check_adaptive(self)
        if (self.scoring == "released" and self.format.kind == "per_paragraph" and self.temperature >= 1e-5
                and self.top_k <= 0):
            raise ValueError(f"scoring='released' with format {self.format.name!r} needs top_k >= 1 (vLLM 0.7.1's "
                             f"returned log-probabilities come after top-k; the release ran top_k=20) or "
                             f"temperature 0, got top_k={self.top_k}; accepted: a top_k >= 1, or scoring='exact'")
        if self.budget_tokens is not None and not 0 < self.budget_tokens <= self.max_tokens:
            raise ValueError(f"budget_tokens={self.budget_tokens!r} is invalid; accepted: None or an int in "
                             f"(0, max_tokens={self.max_tokens}]")

    def continuation_for(self, round_: int) -> str:
        if self.continuation is not None:
            return self.continuation
        phrases = self.format.continuations or ("\nWait, let me check that again.\n",)
        return phrases[round_ % len(phrases)]

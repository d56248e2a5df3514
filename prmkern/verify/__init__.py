"""Generative verification: prompt formats, output parsing, verdict scoring and ProcessBench evaluation.

The protocols that run a verifier through the engine build on these pieces; nothing here loads a model.
"""
from .formats import (CRITIC, FORMATS, GENPRM, PRMKERN, THINKPRM, VerifierFormat, format_defaults, get_format,
                      load_formats, register_format)
from .parsing import STEP_STATUSES, ParsedOutput, StepVerdict, parse_output
from .processbench import (balanced_limit, evaluate_subsets, load_processbench, plurality_vote, processbench_f1,
                           sample_path)
from .scoring import (
    ChainScores,
    Generated,
    SolutionScores,
    StepScore,
    VerdictScore,
    aggregate,
    earliest_error,
    genprm_paragraph_score,
    score_chain,
    solution_score,
    token_char_offsets,
    verdict_probability,
)

__all__ = [
    "VerifierFormat", "FORMATS", "THINKPRM", "GENPRM", "CRITIC", "PRMKERN", "get_format", "register_format", "load_formats",
    "format_defaults", "genprm_paragraph_score", "plurality_vote", "balanced_limit",
    "StepVerdict", "ParsedOutput", "parse_output", "STEP_STATUSES",
    "Generated", "VerdictScore", "ChainScores", "StepScore", "SolutionScores", "token_char_offsets",
    "verdict_probability", "score_chain", "aggregate", "solution_score", "earliest_error",
    "load_processbench", "processbench_f1", "evaluate_subsets", "sample_path",
]

"""The exact strings the released verifiers were trained and run with, verbatim, each with its source.

These strings are an interface, like a chat template's special tokens: a checkpoint fine-tuned on one wording is a
different (worse) verifier under another. Nothing else of the source repositories is carried here; formats.py builds
the prompt formats from these strings and protocols.py runs them. Each constant's source is in SOURCES (repository,
commit of the version read, file); `source(name)` returns it.

Notes on what was read:
* ThinkPRM (mukhal/ThinkPRM): `utils/helper.py` (the prompt; "models were trained with this" instruction) and
  `prm/thinkprm_api.py` (stops, the forced final question, its labels, sequential-scaling phrases, defaults). The
  issue cites commit 0beccfb; the version read is 214cce98 (the helper and API files).
* GenPRM (RyanLiu112/GenPRM): `src/prm_evaluation/infer_module/genprm_inference.py` (stage openers, stops, code
  executor strings, sampling constants), `src/prm_evaluation/infer_module/prm_evaluate.py` (system prompt, turn
  layout), `src/prm_evaluation/utils/util.py` (`build_prompt`: no generation prompt, trailing EOS stripped).
* ProcessBench (QwenLM/ProcessBench): `code/templates/critique_template.txt` (read with `.strip()` and filled with
  str.format, hence the doubled braces) and `code/run_eval.py` (boxed-answer regex, sampling). The official repository
  file is not in the code index used here; the template text was checked against independent verbatim copies
  (HaoooWang/awesome-llm-prompts self-correction/qwen.md, which links the official file, and the run_eval.py of the
  fork ljxzs-jjlzs/ProcessBench at 606615c1).
* Qwen2.5-Math-PRM (huggingface.co/Qwen/Qwen2.5-Math-PRM-7B, README.md, the model card's transformers usage): the
  system prompt and the step separator `<extra_0>` appended after every step of the assistant turn. Read from a
  verbatim copy of the model card in the code index (no commit of the hub repository was visible).
"""
from __future__ import annotations

__all__ = ["SOURCES", "source", "QWEN_PRM_SYSTEM", "QWEN_PRM_STEP_TAG",
           "THINKPRM_INSTRUCTION_TEMPLATE", "THINKPRM_INSTRUCTION", "THINKPRM_GENERATION_PREFIX", "THINKPRM_STEP_PREFIX",
           "THINKPRM_STEP_CLEAN_REGEX", "THINKPRM_STOPS", "THINKPRM_PREDECISION", "THINKPRM_LABELS",
           "THINKPRM_TRIGGER_PHRASES",
           "GENPRM_SYSTEM", "GENPRM_ANALYZE_TEMPLATE", "GENPRM_VERIFY_TEMPLATE", "GENPRM_OUTPUT_TEMPLATE",
           "GENPRM_ANALYZE_STOP", "GENPRM_CODE_STOPS", "GENPRM_OUTPUT_STOP", "GENPRM_CODE_OUTPUT_TEMPLATE",
           "GENPRM_NO_CODE", "GENPRM_TIMEOUT_TEMPLATE", "GENPRM_TIMEOUT_MESSAGE", "GENPRM_ERROR_TEMPLATE",
           "GENPRM_CODE_REGEX", "GENPRM_DECISION_REGEX", "GENPRM_YES", "GENPRM_NO", "GENPRM_FIRST_TURN_JOIN",
           "PROCESSBENCH_CRITIQUE_TEMPLATE", "PROCESSBENCH_PARAGRAPH_TEMPLATE", "PROCESSBENCH_ANSWER_REGEX"]

_THINKPRM = ("mukhal/ThinkPRM", "214cce9832985e9a79de34c880627b3f5c51c944")
_GENPRM = ("RyanLiu112/GenPRM", "590bc94204e1f9ecb153ed61eb2f91f09703012d")
_QWEN_PRM = ("Qwen/Qwen2.5-Math-PRM-7B", "Hugging Face model card (no commit visible; read from a verbatim copy)")
_PB = ("QwenLM/ProcessBench", "e802463 (issue 9's citation; file text verified against verbatim copies)")

# -- ThinkPRM ---------------------------------------------------------------------------------------------------
# format_verification_cot_for_thinkprm: the template after .strip(); filled by str.replace of {problem}, {solution},
# then {_instruction} (in that order), never by str.format.
THINKPRM_INSTRUCTION_TEMPLATE = """You are given a math problem and a proposed step-by-step solution:

[Math Problem]

{problem}

[Solution]

{solution}

{_instruction}"""
THINKPRM_INSTRUCTION = ("Review and critique each step in the proposed solution to determine whether each step is "
                        "correct. If the solution is incomplete, only verify the provided steps.")
THINKPRM_GENERATION_PREFIX = "\nLet's verify step by step:"  # appended after the chat template's generation prompt
# APIThinkPRMVerifier(process_verifier=True): each step has "Step k:" removed, is stripped, and gets this prefix;
# the steps are joined with "\n".
THINKPRM_STEP_PREFIX = "Step {i}: "
THINKPRM_STEP_CLEAN_REGEX = r"Step \d+:"
# Stops of the verification chain (plus the tokenizer's EOS, and "Step {n+1}:" for a process verifier).
THINKPRM_STOPS = ("Is the solution correct?", "</think>")
THINKPRM_PREDECISION = "\nIs the solution correct? "  # appended after the chain; then the label is chosen
THINKPRM_LABELS = ("yes", "no")  # label_categories "yes,no"; score_label_idx 0
THINKPRM_TRIGGER_PHRASES = ("Let me double check", "Let's verify again", "Did I miss something?")  # budget forcing

# -- GenPRM -----------------------------------------------------------------------------------------------------
GENPRM_SYSTEM = "You are a math teacher. Your task is to review and critique the paragraphs in solution step by step."
GENPRM_FIRST_TURN_JOIN = "\n"  # the first user turn is problem + "\n" + paragraph 1; later turns are the paragraph
GENPRM_ANALYZE_TEMPLATE = "<analyze>\nLet's analyze the Paragraph {cur_step} step by step: "
GENPRM_VERIFY_TEMPLATE = "<verify>\nLet's use python code to find any potential error:\n```python\n"
GENPRM_OUTPUT_TEMPLATE = "<output>\n**Judgement**: $\\boxed"
GENPRM_ANALYZE_STOP = "</analyze>\n"
GENPRM_CODE_STOPS = ("\n```\n", "</output>\n")
GENPRM_OUTPUT_STOP = "</output>\n"
GENPRM_CODE_OUTPUT_TEMPLATE = "[Code Output]\n\n```\n{code_output}\n```\n"
GENPRM_CODE_REGEX = r"```python\s*(.*?)\s*```"  # re.DOTALL; the last block, stripped
GENPRM_NO_CODE = "Code format error: No code found."
GENPRM_TIMEOUT_MESSAGE = "Code execution timed out"
GENPRM_TIMEOUT_TEMPLATE = "Code execute time out: {error}"
GENPRM_ERROR_TEMPLATE = "Code execute Error: {type}: {error}"
GENPRM_DECISION_REGEX = r"(Yes|No)\}"  # re.IGNORECASE, first match in the whole turn
GENPRM_YES, GENPRM_NO = "Yes", "No"  # the score reads these tokens (tokenizer.encode(word)[-1])

# -- ProcessBench ------------------------------------------------------------------------------------------------
PROCESSBENCH_CRITIQUE_TEMPLATE = """The following is a math problem and a solution (split into paragraphs, enclosed with tags and indexed from 0):

[Math Problem]

{problem}

[Solution]

{tagged_response}

Your task is to review and critique the solution paragraph by paragraph. Once you identify an error in a paragraph, return the index of the paragraph where the earliest error occurs. Otherwise, return the index of -1 (which typically denotes "not found").

Please put your final answer (i.e., the index) in \\boxed{{}}."""
PROCESSBENCH_PARAGRAPH_TEMPLATE = "<paragraph_{sdx}>\n{step}\n</paragraph_{sdx}>\n\n"  # concatenated, then .strip()
PROCESSBENCH_ANSWER_REGEX = r"\\boxed\{([^}]*)\}"  # the last match, stripped

# Qwen2.5-Math-PRM: the model card's data["system"] and the separator "<extra_0>" ("<extra_0>".join(steps) +
# "<extra_0>").
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_PRM_STEP_TAG = "<extra_0>"

SOURCES: dict[str, tuple[str, str, str]] = {
    **{name: (*_QWEN_PRM, "README.md") for name in ("QWEN_PRM_SYSTEM", "QWEN_PRM_STEP_TAG")},
    **{name: (*_THINKPRM, "utils/helper.py") for name in
       ("THINKPRM_INSTRUCTION_TEMPLATE", "THINKPRM_INSTRUCTION", "THINKPRM_GENERATION_PREFIX")},
    **{name: (*_THINKPRM, "prm/thinkprm_api.py") for name in
       ("THINKPRM_STEP_PREFIX", "THINKPRM_STEP_CLEAN_REGEX", "THINKPRM_STOPS", "THINKPRM_PREDECISION",
        "THINKPRM_LABELS", "THINKPRM_TRIGGER_PHRASES")},
    **{name: (*_GENPRM, "src/prm_evaluation/infer_module/prm_evaluate.py") for name in
       ("GENPRM_SYSTEM", "GENPRM_FIRST_TURN_JOIN")},
    **{name: (*_GENPRM, "src/prm_evaluation/infer_module/genprm_inference.py") for name in
       ("GENPRM_ANALYZE_TEMPLATE", "GENPRM_VERIFY_TEMPLATE", "GENPRM_OUTPUT_TEMPLATE", "GENPRM_ANALYZE_STOP",
        "GENPRM_CODE_STOPS", "GENPRM_OUTPUT_STOP", "GENPRM_CODE_OUTPUT_TEMPLATE", "GENPRM_CODE_REGEX",
        "GENPRM_NO_CODE", "GENPRM_TIMEOUT_MESSAGE", "GENPRM_TIMEOUT_TEMPLATE", "GENPRM_ERROR_TEMPLATE",
        "GENPRM_DECISION_REGEX", "GENPRM_YES", "GENPRM_NO")},
    "PROCESSBENCH_CRITIQUE_TEMPLATE": (*_PB, "code/templates/critique_template.txt"),
    **{name: (*_PB, "code/run_eval.py") for name in ("PROCESSBENCH_PARAGRAPH_TEMPLATE", "PROCESSBENCH_ANSWER_REGEX")},
}


def source(name: str) -> tuple[str, str, str]:
    """(repository, commit, file) that the constant `name` was copied from."""
    if name not in SOURCES:
        raise KeyError(f"no released string named {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name]

"""Verifier prompt formats as data: how a (problem, steps) pair becomes a prompt, and what a verdict looks like.

Built-in formats:

* ``thinkprm``: ThinkPRM's released prompt, byte for byte (released_prompts.py): one user turn, the solution as
  "Step k: ..." lines, the chat template's generation prompt, then "\nLet's verify step by step:". The chain judges
  steps with ``\boxed{correct}`` / ``\boxed{incorrect}``; generation stops at "Is the solution correct?",
  ``</think>``, EOS or "Step {n+1}:", then "\nIs the solution correct? " is appended and P(yes) is read.
* ``genprm``: GenPRM's released conversation: its system prompt, one user turn per paragraph (the first is
  problem + "\n" + paragraph 1), the earlier assistant turns in full (forced openers included), rendered without
  the generation prompt and with a trailing EOS stripped, then "<analyze>\nLet's analyze the Paragraph k step by
  step: ". Verdict ``$\boxed{Yes}$`` / ``$\boxed{No}$``.
* ``critic``: ProcessBench's critique template (paragraphs tagged and indexed from 0); the answer is the index of
  the earliest wrong paragraph in ``\boxed{}``, -1 if none.
* ``qwen-prm``: a discriminative PRM (Qwen2.5-Math-PRM): system prompt, the problem as the user turn, the
  steps as the assistant turn with ``<extra_0>`` after each; one forward pass, no chain; a step's score is the
  pooled P(correct) at its separator (prmkern/pooling.py). Source: the Qwen2.5-Math-PRM-7B model card's usage.
* ``prmkern``: the reworded ThinkPRM-shaped format the shipped verifier (prmkern/data/verifier) was trained on. It
  is kept for that checkpoint only; a real ThinkPRM checkpoint wants ``thinkprm``.

``FORMATS`` is the registry; ``register_format`` adds one; ``load_formats(path)`` reads user formats from a JSON
file (an object or a list of objects with VerifierFormat's field names). ``format_defaults(name)`` gives the
sampling settings each format's authors ran (K, temperature, top_p, top_k, max tokens, scoring method).
Rendering goes through a Hugging Face tokenizer's chat template when it has one, else a plain "role: content" layout.

It does not: generate, parse outputs (see parsing.py) or score (scoring.py).
"""
from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import released_prompts as R

__all__ = ["VerifierFormat", "FORMATS", "register_format", "get_format", "load_formats", "THINKPRM", "GENPRM",
           "CRITIC", "PRMKERN", "QWEN_PRM", "render_messages", "format_defaults", "VARIANTS"]

KINDS = ("per_step", "per_paragraph", "earliest_error", "discriminative")


@dataclass(frozen=True)
class VerifierFormat:
    """A verifier's prompt and output conventions.

    kind: "per_step" (one chain judges every step), "per_paragraph" (one assistant turn per paragraph, GenPRM),
    "earliest_error" (one chain names the earliest wrong step, ProcessBench critic), "discriminative" (no chain:
    a reward model's pooled rows at the step separators, the steps as the assistant turn).
    Templates use str.format fields: {problem}, {solution} (the rendered steps), {k} (step number), {text}.
    """

    name: str
    kind: str
    user_template: str  # per_step / earliest_error: the single user turn; per_paragraph: each paragraph's turn
    step_template: str = "{text}"  # one step of the solution, with {k} and {text}
    step_separator: str = "\n"
    step_base: int = 1  # the number of the first step in the prompt (ThinkPRM 1, critic 0)
    system_prompt: str | None = None
    first_turn_template: str = "{problem}\n{text}"  # per_paragraph: the first paragraph's user turn
    generation_prefix: str = ""  # text that opens the assistant turn (may use {k})
    # Verdicts. The verdict word follows verdict_prefix; its first token is the one whose probability is read.
    verdict_prefix: str = "\\boxed{"
    correct_text: str = "correct"
    incorrect_text: str = "incorrect"
    verdict_regex: str = r"\\boxed\{(?P<verdict>[^{}]*)(?P<close>\})?"  # per step (or per paragraph turn)
    step_header_regex: str | None = r"Step\s*(?P<step>\d+)\s*:"  # per_step: where each step's judgement starts
    final_regex: str | None = None  # per_step: overall verdict, group "verdict"
    index_regex: str | None = None  # earliest_error: the index, group "index"
    stop: tuple[str, ...] = ()
    # per_paragraph (GenPRM) code rounds
    code_stop: tuple[str, ...] = ()
    code_regex: str | None = None  # extracts the code from a turn, group "code"
    code_output_template: str = "{output}"  # how the executed code's output is appended, with {output}
    case_sensitive: bool = False
    # Rendering, so released prompts come out byte for byte.
    substitution: str = "format"  # "format": str.format; "replace": str.replace of {problem}, {solution},
    #                               {_instruction} in that order (ThinkPRM's helper)
    instruction: str = ""  # {_instruction}
    step_clean_regex: str | None = None  # removed from each step before it is numbered (ThinkPRM: "Step \d+:")
    strip_steps: bool = True
    strip_problem: bool = True
    strip_solution: bool = False  # strip the joined solution (ProcessBench's tagged response)
    add_generation_prompt: bool = True  # GenPRM renders without it ...
    strip_eos: bool = False  # ... and cuts a trailing EOS (+"\n") off the rendered conversation
    # per_step: the forced final verdict (ThinkPRM): appended after the chain; P(correct label) is then read.
    final_prefix: str | None = None
    final_labels: tuple[str, str] = ("yes", "no")
    step_stop_template: str | None = None  # a stop "Step {n}:" with n = number of steps + 1
    continuations: tuple[str, ...] = ()  # budget forcing: text appended per forcing round (cycled)
    # per_paragraph (GenPRM) stages: openers forced after the analysis and at the degraded verdict
    verify_prefix: str = ""
    output_prefix: str = ""
    analyze_stop: tuple[str, ...] = ()
    decision_regex: str | None = None  # GenPRM's score: first match decides which verdict token is read

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"VerifierFormat.name must be a non-empty str, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"VerifierFormat.kind must be one of {KINDS}, got {self.kind!r}")
        if self.correct_text == self.incorrect_text:
            raise ValueError(f"correct_text and incorrect_text must differ, both are {self.correct_text!r}")
        for name in ("verdict_regex", "step_header_regex", "final_regex", "index_regex", "code_regex"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"VerifierFormat.{name} is not a valid regex: {pattern!r} ({e})") from e
        if "verdict" not in re.compile(self.verdict_regex).groupindex:
            raise ValueError(f"verdict_regex needs a named group 'verdict', got {self.verdict_regex!r}")
        if self.kind == "earliest_error" and not self.index_regex:
            raise ValueError("an earliest_error format needs index_regex with a named group 'index'")
        if self.substitution not in ("format", "replace"):
            raise ValueError(f"VerifierFormat.substitution must be 'format' or 'replace', got {self.substitution!r}")
        for name in ("stop", "code_stop", "final_labels", "continuations", "analyze_stop"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.final_labels) != 2 or self.final_labels[0] == self.final_labels[1]:
            raise ValueError(f"final_labels must be two different words, got {self.final_labels!r}")
        self._check_templates()

    def _check_templates(self) -> None:
        """Every str.format field a template names is one its renderer passes (a typo such as {problme} failed each
        record's render after the model loaded); "replace" templates leave unknown fields as text."""
        # the fields _fill is given: {tagged_response} is ProcessBench's name for {solution}
        turn = {"problem", "text", "k"} if self.kind == "per_paragraph" else (
            {"problem"} if self.kind == "discriminative" else {"problem", "solution", "tagged_response"})
        checks = {"step_template": {"k", "text"}, "generation_prefix": {"k"}, "code_output_template": {"output"}}
        if self.step_stop_template is not None:
            checks["step_stop_template"] = {"n"}
        if self.substitution == "format":
            checks["user_template"] = turn
            if self.kind == "per_paragraph":
                checks["first_turn_template"] = turn
        for name, accepted in checks.items():
            template = getattr(self, name)
            if not isinstance(template, str):
                raise ValueError(f"format {self.name!r}: {name}={template!r} is invalid; accepted: a str")
            try:
                used = _format_fields(template)
            except ValueError as e:
                raise ValueError(f"format {self.name!r}: {name} is not a valid str.format template ({e}); write a "
                                 f"literal brace as {{{{ or }}}}") from None
            unknown = sorted(used - accepted)
            if unknown:
                raise ValueError(f"format {self.name!r}: {name} names unknown field(s) "
                                 f"{', '.join('{' + f + '}' for f in unknown)}; accepted for a {self.kind} format: "
                                 f"{', '.join('{' + f + '}' for f in sorted(accepted))} (a literal brace is "
                                 f"written {{{{ or }}}})")

    # -- prompts ---------------------------------------------------------------------------------------

    def _step_text(self, s: str) -> str:
        if self.step_clean_regex:
            s = re.sub(self.step_clean_regex, "", s)
        return s.strip() if self.strip_steps else s

    def render_solution(self, steps: Sequence[str]) -> str:
        _check_steps(steps)
        out = self.step_separator.join(
            self.step_template.format(k=i + self.step_base, text=self._step_text(s)) for i, s in enumerate(steps))
        return out.strip() if self.strip_solution else out

    def _fill(self, template: str, **values: Any) -> str:
        if self.substitution == "replace":
            for key in ("problem", "solution", "_instruction", "text", "k"):
                if key in values:
                    template = template.replace("{" + key + "}", str(values[key]))
            return template
        values.pop("_instruction", None)
        return template.format(**values, tagged_response=values.get("solution", ""))

    def messages(self, problem: str, steps: Sequence[str], *, paragraph: int | None = None,
                 history: Sequence[str] = ()) -> list[dict[str, str]]:
        """Chat messages for the prompt.

        per_paragraph: the conversation up to paragraph `paragraph` (0-based), with `history` the assistant
        turns already written for paragraphs 0..paragraph-1 (their full text, code outputs included)."""
        if not isinstance(problem, str):
            raise TypeError(f"problem must be a str, got {type(problem).__name__}")
        _check_steps(steps)
        msgs: list[dict[str, str]] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        prob = problem.strip() if self.strip_problem else problem
        if self.kind == "discriminative":  # the solution is the assistant's turn, each step closed by the separator
            msgs.append({"role": "user", "content": self._fill(self.user_template, problem=prob)})
            msgs.append({"role": "assistant", "content": self.render_solution(steps)})
            return msgs
        if self.kind != "per_paragraph":
            msgs.append({"role": "user", "content": self._fill(
                self.user_template, problem=prob, solution=self.render_solution(steps), _instruction=self.instruction)})
            return msgs
        if paragraph is None:
            paragraph = len(history)
        if not 0 <= paragraph < len(steps):
            raise ValueError(f"paragraph must be in [0, {len(steps)}), got {paragraph}")
        if len(history) != paragraph:
            raise ValueError(f"history must hold the {paragraph} earlier assistant turns, got {len(history)}")
        for i in range(paragraph + 1):
            text = self._step_text(steps[i])
            content = self._fill(self.first_turn_template if i == 0 else self.user_template,
                                 problem=prob, text=text, k=i + self.step_base)
            msgs.append({"role": "user", "content": content})
            if i < paragraph:
                msgs.append({"role": "assistant", "content": history[i]})
        return msgs

    def prefix(self, paragraph: int | None = None) -> str:
        """The text that opens the assistant turn (GenPRM numbers it by paragraph, from step_base)."""
        k = (paragraph or 0) + self.step_base
        return self.generation_prefix.format(k=k)

    def render(self, problem: str, steps: Sequence[str], tokenizer: Any = None, *, paragraph: int | None = None,
               history: Sequence[str] = ()) -> str:
        """The prompt string: chat template (with the generation prompt) + this format's assistant prefix."""
        msgs = self.messages(problem, steps, paragraph=paragraph, history=history)
        return render_messages(msgs, tokenizer, add_generation_prompt=self.add_generation_prompt,
                               strip_eos=self.strip_eos) + self.prefix(paragraph)

    def stops(self, num_steps: int) -> tuple[str, ...]:
        """Stop strings of a chain over a solution of num_steps steps (the format's, plus "Step {n+1}:")."""
        extra = (self.step_stop_template.format(n=num_steps + self.step_base),) if self.step_stop_template else ()
        return tuple(self.stop) + extra

    # -- verdict tokens --------------------------------------------------------------------------------

    def verdict_token_ids(self, tokenizer: Any) -> tuple[int, int]:
        """(id of the first token of the correct verdict, id for the incorrect one), as they are tokenised
        right after verdict_prefix. ValueError when the two verdicts share their first token."""
        ids = []
        base = tokenizer.encode(self.verdict_prefix, add_special_tokens=False)
        for word in (self.correct_text, self.incorrect_text):
            full = tokenizer.encode(self.verdict_prefix + word, add_special_tokens=False)
            i = 0
            while i < min(len(base), len(full)) and base[i] == full[i]:
                i += 1
            if i >= len(full):
                raise ValueError(f"{word!r} adds no token after {self.verdict_prefix!r}")
            ids.append(full[i])
        if ids[0] == ids[1]:
            raise ValueError(f"format {self.name!r}: {self.correct_text!r} and {self.incorrect_text!r} start with "
                             f"the same token {ids[0]}; their probabilities cannot be read from one position")
        return ids[0], ids[1]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _format_fields(template: str) -> set[str]:
    """The fields a str.format template names ("" for a positional {}); the name as written when it reaches into a
    value ({problem.x}, {k[0]}), which no renderer supports. ValueError for a malformed template (a lone brace)."""
    out: set[str] = set()
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is None:
            continue
        out.add(name)
        if spec:
            out |= _format_fields(spec)  # nested fields of a format spec: {text:>{width}}
    return out


def _check_steps(steps: Sequence[str]) -> None:
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise TypeError(f"steps must be a sequence of str, got {type(steps).__name__}")
    if not steps:
        raise ValueError("steps must not be empty")
    for s in steps:
        if not isinstance(s, str):
            raise TypeError(f"each step must be a str, got {type(s).__name__}")


def render_messages(messages: list[dict[str, str]], tokenizer: Any = None, *, add_generation_prompt: bool = True,
                    strip_eos: bool = False) -> str:
    """Through the tokenizer's chat template when it has one, else plain text.

    strip_eos: cut a trailing EOS token (followed by "\n" or not) off the rendering, as GenPRM's build_prompt does."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        eos = getattr(tokenizer, "eos_token", None)
        if strip_eos and eos:
            if out.endswith(eos + "\n"):
                out = out[:-len(eos + "\n")]
            elif out.endswith(eos):
                out = out[:-len(eos)]
        return out
    parts = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + ("\n\nassistant: " if add_generation_prompt else "")


# -- built-in formats ---------------------------------------------------------------------------------

# The reworded format the shipped verifier (prmkern/data/verifier) was trained on; not ThinkPRM's prompt.
PRMKERN = VerifierFormat(
    name="prmkern",
    kind="per_step",
    user_template=(
        "Here is a math problem and a proposed solution, one step per line:\n\n"
        "[Math Problem]\n\n{problem}\n\n[Solution]\n\n{solution}\n\n"
        "Check each step of the proposed solution and decide whether it is correct. "
        "If the solution stops early, judge only the steps that are given."
    ),
    step_template="Step {k}: {text}",
    step_separator="\n",
    step_base=1,
    generation_prefix="\nLet's verify step by step:",
    correct_text="correct",
    incorrect_text="incorrect",
    verdict_regex=r"\\boxed\{(?P<verdict>[^{}]*)(?P<close>\})?",
    step_header_regex=r"Step\s*(?P<step>\d+)\s*:",
    final_regex=r"Is the solution correct\?\s*(?P<verdict>Yes|No)",
    stop=(),
    continuations=("\nWait, let me check that again.\n",),
)

THINKPRM = VerifierFormat(
    name="thinkprm",
    kind="per_step",
    user_template=R.THINKPRM_INSTRUCTION_TEMPLATE,
    substitution="replace",
    instruction=R.THINKPRM_INSTRUCTION,
    step_template=R.THINKPRM_STEP_PREFIX.replace("{i}", "{k}") + "{text}",
    step_clean_regex=R.THINKPRM_STEP_CLEAN_REGEX,
    step_separator="\n",
    step_base=1,
    strip_problem=False,
    generation_prefix=R.THINKPRM_GENERATION_PREFIX,
    correct_text="correct",
    incorrect_text="incorrect",
    verdict_regex=r"\\boxed\{(?P<verdict>[^{}]*)(?P<close>\})?",
    step_header_regex=r"Step\s*(?P<step>\d+)\s*:",
    final_regex=r"Is the solution correct\?\s*(?P<verdict>[Yy]es|[Nn]o)",
    stop=R.THINKPRM_STOPS,
    step_stop_template="Step {n}:",
    final_prefix=R.THINKPRM_PREDECISION,
    final_labels=R.THINKPRM_LABELS,
    continuations=R.THINKPRM_TRIGGER_PHRASES,
)

GENPRM = VerifierFormat(
    name="genprm",
    kind="per_paragraph",
    system_prompt=R.GENPRM_SYSTEM,
    first_turn_template="{problem}" + R.GENPRM_FIRST_TURN_JOIN + "{text}",
    user_template="{text}",
    step_base=1,
    strip_steps=False,
    strip_problem=False,
    add_generation_prompt=False,
    strip_eos=True,
    generation_prefix=R.GENPRM_ANALYZE_TEMPLATE.replace("{cur_step}", "{k}"),
    verify_prefix=R.GENPRM_VERIFY_TEMPLATE,
    output_prefix=R.GENPRM_OUTPUT_TEMPLATE,
    analyze_stop=(R.GENPRM_ANALYZE_STOP,),
    verdict_prefix="$\\boxed{",
    correct_text=R.GENPRM_YES,
    incorrect_text=R.GENPRM_NO,
    verdict_regex=r"\\boxed\{(?P<verdict>[^{}]*)(?P<close>\})?",
    decision_regex=R.GENPRM_DECISION_REGEX,
    step_header_regex=None,
    stop=(R.GENPRM_OUTPUT_STOP,),
    code_stop=R.GENPRM_CODE_STOPS,
    code_regex=R.GENPRM_CODE_REGEX,
    code_output_template=R.GENPRM_CODE_OUTPUT_TEMPLATE.replace("{code_output}", "{output}"),
    case_sensitive=True,
)

CRITIC = VerifierFormat(
    name="critic",
    kind="earliest_error",
    user_template=R.PROCESSBENCH_CRITIQUE_TEMPLATE,
    step_template=R.PROCESSBENCH_PARAGRAPH_TEMPLATE.replace("{sdx}", "{k}").replace("{step}", "{text}")[:-2],
    step_separator="\n\n",
    step_base=0,
    strip_steps=False,
    strip_problem=False,
    strip_solution=True,
    verdict_regex=r"\\boxed\{(?P<verdict>[^}]*)(?P<close>\})?",
    step_header_regex=None,
    index_regex=R.PROCESSBENCH_ANSWER_REGEX,
    correct_text="-1",
    incorrect_text="0",
)

# Qwen2.5-Math-PRM (discriminative): the model card's usage, verbatim: system prompt, the query as the user turn,
# "<extra_0>".join(steps) + "<extra_0>" as the assistant turn, rendered without the generation prompt.
QWEN_PRM = VerifierFormat(
    name="qwen-prm",
    kind="discriminative",
    system_prompt=R.QWEN_PRM_SYSTEM,
    user_template="{problem}",
    step_template="{text}" + R.QWEN_PRM_STEP_TAG,
    step_separator="",
    strip_steps=False,
    strip_problem=False,
    add_generation_prompt=False,
    step_header_regex=None,
)

# What each format's authors ran (K chains, sampling, per-chain token budget, solution score). ThinkPRM: n=1 at
# T=0 for best-of-N (thinkprm.yaml), n=4 at T=0.4 for parallel scaling, max_length 8192 (generation gets 8192-20).
# GenPRM: T=0.6, top_p=0.95, top_k=20, 2048 tokens per paragraph turn, 3 generation rounds, Maj@N = N judgements
# per paragraph. ProcessBench: greedy, 8192 tokens; with voting n=8 at T=1, top_p=0.9.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "thinkprm": dict(num_chains=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=8192 - 20, method="final"),
    "genprm": dict(num_chains=1, temperature=0.6, top_p=0.95, top_k=20, max_tokens=2048, method="min",
                   max_code_rounds=3),
    "critic": dict(num_chains=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=8192, method="vote"),
    "qwen-prm": dict(num_chains=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=1, method="min"),
    "prmkern": dict(num_chains=8, temperature=0.6, top_p=0.95, top_k=-1, max_tokens=1024, method="min"),
}
# The voting variants the papers also ran (pass these as overrides).
VARIANTS: dict[str, dict[str, Any]] = {
    "thinkprm-parallel": dict(num_chains=4, temperature=0.4),
    "critic-voting": dict(num_chains=8, temperature=1.0, top_p=0.9),
}


def format_defaults(name: str | VerifierFormat) -> dict[str, Any]:
    """The sampling and scoring settings the format's authors ran, as VerifyConfig keyword arguments.

    A user format without entry inherits nothing format-specific (empty dict: VerifyConfig's own defaults)."""
    fmt_name = name.name if isinstance(name, VerifierFormat) else name
    if not isinstance(fmt_name, str):
        raise TypeError(f"format name must be a str or VerifierFormat, got {type(name).__name__}")
    return dict(_DEFAULTS.get(fmt_name, {}))


FORMATS: dict[str, VerifierFormat] = {f.name: f for f in (THINKPRM, GENPRM, CRITIC, PRMKERN, QWEN_PRM)}


def register_format(fmt: VerifierFormat, *, replace: bool = False) -> VerifierFormat:
    if not isinstance(fmt, VerifierFormat):
        raise TypeError(f"expected a VerifierFormat, got {type(fmt).__name__}")
    if fmt.name in FORMATS and not replace:
        raise ValueError(f"a format named {fmt.name!r} exists; pass replace=True to override it")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str | VerifierFormat) -> VerifierFormat:
    if isinstance(name, VerifierFormat):
        return name
    if name not in FORMATS:
        raise ValueError(f"unknown verifier format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]


def load_formats(path: str | Path, *, register: bool = True, replace: bool = False) -> list[VerifierFormat]:
    """Reads user formats from a JSON file: one object, or a list, with VerifierFormat field names.

    An object may name "base": an existing format whose fields it overrides."""
    data = json.loads(Path(path).read_text())
    items = data if isinstance(data, list) else [data]
    known = {f.name for f in fields(VerifierFormat)}
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError(f"{path}: each format must be a JSON object, got {type(item).__name__}")
        item = dict(item)
        base = item.pop("base", None)
        unknown = set(item) - known
        if unknown:
            raise ValueError(f"{path}: unknown format fields {sorted(unknown)}; accepted: {sorted(known)}")
        merged = get_format(base).to_dict() if base else {}
        merged.update(item)
        for key in ("stop", "code_stop", "final_labels", "continuations", "analyze_stop"):
            if key in merged:
                value = merged[key]
                if isinstance(value, str):  # one string, as vLLM reads stop="..." (tuple() split it into characters)
                    value = [value]
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{path}: format {item.get('name', base)!r} field {key!r} is {value!r}; "
                                     f"accepted: a string or a list of strings")
                merged[key] = tuple(value)
        fmt = VerifierFormat(**merged)
        if register:
            register_format(fmt, replace=replace)
            if base and fmt.name not in _DEFAULTS:  # a variant of a built-in runs with its base's defaults
                _DEFAULTS[fmt.name] = format_defaults(base)
        out.append(fmt)
    return out

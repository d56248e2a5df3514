"""Verifier prompt formats as data: how a (problem, steps) pair becomes a prompt, and what a verdict looks like.

Three built-in formats, following the published models (the wording here is our own, the structure is theirs):

* ``thinkprm``: one user turn with the problem and the solution as "Step k: ..." lines (k from 1); the verifier
  writes a chain that judges each step "Step k: ... The step is \\boxed{correct}" (or ``\\boxed{incorrect}``)
  and ends "Is the solution correct? Yes" (or "No"). The assistant turn is primed with "Let's verify step by
  step:".
* ``genprm``: a system turn, then one user turn per paragraph (the first carries the problem) and one assistant
  turn per paragraph: ``<analyze>`` reasoning ``</analyze>``, ``<verify>`` with a ```python``` block whose
  printed output is appended as "[Code Output]" in a fenced block ``</verify>``, and ``<output>`` with
  ``**Judgement**: $\\boxed{Yes}$`` or ``$\\boxed{No}$`` ``</output>``. Generation stops after a code block so
  the code can run (see prmkern.sandbox) and resumes with its output.
* ``critic``: ProcessBench's critic prompt: paragraphs tagged and indexed from 0; the answer is the index of the
  earliest wrong paragraph in ``\\boxed{}``, -1 if none.

``FORMATS`` is the registry; ``register_format`` adds one; ``load_formats(path)`` reads user formats from a JSON
file (an object or a list of objects with VerifierFormat's field names). Rendering goes through a Hugging Face
tokenizer's chat template when it has one, else a plain "role: content" layout.

It does not: generate, parse outputs (see parsing.py) or score (scoring.py).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["VerifierFormat", "FORMATS", "register_format", "get_format", "load_formats", "THINKPRM", "GENPRM",
           "CRITIC", "render_messages"]

KINDS = ("per_step", "per_paragraph", "earliest_error")


@dataclass(frozen=True)
class VerifierFormat:
    """A verifier's prompt and output conventions.

    kind: "per_step" (one chain judges every step), "per_paragraph" (one assistant turn per paragraph, GenPRM),
    "earliest_error" (one chain names the earliest wrong step, ProcessBench critic).
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
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "code_stop", tuple(self.code_stop))

    # -- prompts ---------------------------------------------------------------------------------------

    def render_solution(self, steps: Sequence[str]) -> str:
        _check_steps(steps)
        return self.step_separator.join(
            self.step_template.format(k=i + self.step_base, text=s.strip()) for i, s in enumerate(steps))

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
        if self.kind != "per_paragraph":
            msgs.append({"role": "user", "content": self.user_template.format(
                problem=problem.strip(), solution=self.render_solution(steps))})
            return msgs
        if paragraph is None:
            paragraph = len(history)
        if not 0 <= paragraph < len(steps):
            raise ValueError(f"paragraph must be in [0, {len(steps)}), got {paragraph}")
        if len(history) != paragraph:
            raise ValueError(f"history must hold the {paragraph} earlier assistant turns, got {len(history)}")
        for i in range(paragraph + 1):
            text = steps[i].strip()
            content = (self.first_turn_template.format(problem=problem.strip(), text=text, k=i + self.step_base)
                       if i == 0 else self.user_template.format(problem=problem.strip(), text=text,
                                                                  k=i + self.step_base))
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
        return render_messages(msgs, tokenizer) + self.prefix(paragraph)

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


def _check_steps(steps: Sequence[str]) -> None:
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise TypeError(f"steps must be a sequence of str, got {type(steps).__name__}")
    if not steps:
        raise ValueError("steps must not be empty")
    for s in steps:
        if not isinstance(s, str):
            raise TypeError(f"each step must be a str, got {type(s).__name__}")


def render_messages(messages: list[dict[str, str]], tokenizer: Any = None) -> str:
    """Through the tokenizer's chat template when it has one (generation prompt added), else plain text."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    parts = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nassistant: "


# -- built-in formats ---------------------------------------------------------------------------------

THINKPRM = VerifierFormat(
    name="thinkprm",
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
)

GENPRM = VerifierFormat(
    name="genprm",
    kind="per_paragraph",
    system_prompt="You are a math teacher. Review the solution paragraph by paragraph and judge each one.",
    first_turn_template="{problem}\n{text}",
    user_template="{text}",
    step_base=1,
    generation_prefix="<analyze>\nLet's analyze the Paragraph {k} step by step: ",
    verdict_prefix="$\\boxed{",
    correct_text="Yes",
    incorrect_text="No",
    verdict_regex=r"\*\*Judgement\*\*:\s*\$?\\boxed\{(?P<verdict>[^{}]*)(?P<close>\})?",
    step_header_regex=None,
    stop=("</output>\n",),
    code_stop=("\n```\n",),
    code_regex=r"```python\s*\n(?P<code>.*?)\n```",
    code_output_template="[Code Output]\n\n```\n{output}\n```\n",
    case_sensitive=True,
)

CRITIC = VerifierFormat(
    name="critic",
    kind="earliest_error",
    user_template=(
        "Below are a math problem and a solution split into paragraphs, each in tags and numbered from 0.\n\n"
        "[Math Problem]\n\n{problem}\n\n[Solution]\n\n{solution}\n\n"
        "Critique the solution paragraph by paragraph. When you find an error, give the index of the paragraph "
        "with the earliest error; if there is no error, give -1.\n\n"
        "Put your final answer (the index) in \\boxed{{}}."
    ),
    step_template="<paragraph_{k}>\n{text}\n</paragraph_{k}>",
    step_separator="\n\n",
    step_base=0,
    verdict_regex=r"\\boxed\{(?P<verdict>[^{}]*)(?P<close>\})?",
    step_header_regex=None,
    index_regex=r"\\boxed\{\s*(?P<index>-?\d+)\s*\}",
    correct_text="-1",
    incorrect_text="0",
)

FORMATS: dict[str, VerifierFormat] = {f.name: f for f in (THINKPRM, GENPRM, CRITIC)}


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
        for key in ("stop", "code_stop"):
            if key in merged:
                merged[key] = tuple(merged[key])
        fmt = VerifierFormat(**merged)
        if register:
            register_format(fmt, replace=replace)
        out.append(fmt)
    return out

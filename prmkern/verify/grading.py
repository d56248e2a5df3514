"""Final-answer extraction and equivalence for math answers (MATH, GSM8K style).

``extract_answer`` takes the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), else a "The (final)
answer is ..." phrase. ``normalize`` strips presentation: ``$``, ``\\left``/``\\right``, spacing commands,
``\\text{}`` wrappers and trailing units, degrees, percent and dollar signs, ``\\dfrac``/``\\tfrac``, thousands
separators, trailing periods, a leading ``x =``. ``is_equivalent`` compares normalised strings, then structure
(tuples, intervals, sets, unordered answer lists, ``\\pm``, matrices) element by element, then values with sympy:
a small hand-written LaTeX-to-sympy converter (fractions, roots, powers, pi, infinity, mixed numbers, implicit
products, trig/log names), evaluated in a separate worker process with a per-comparison time limit, so a
pathological expression (``10^{10^{10}}``) cannot hang the caller; a timed-out comparison counts as "not
equivalent" and the worker is restarted.

It does not: parse general LaTeX (no antlr), judge free-form text beyond case-insensitive string equality,
compare answers that need the problem's context (units conversion, "in terms of" rewrites with different
variables), or accept rounded decimals unless they agree to ``rel_tol`` (default 1e-6).
"""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time

__all__ = ["extract_answer", "normalize", "is_equivalent", "grade", "latex_to_sympy"]

# ---------------------------------------------------------------------------------------------------------
# Extraction


def _balanced(text: str, open_at: int) -> int | None:
    """Index just past the brace group opening at text[open_at] == '{', or None if unbalanced."""
    depth = 0
    for i in range(open_at, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{|\s+\S)")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The final answer in a solution: the last complete \\boxed{...}/\\fbox{...}, else 'The answer is X'."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    last = None
    for m in _BOX_RE.finditer(text):
        if m.group(1) == "{":
            end = _balanced(text, m.end() - 1)
            if end is not None:
                last = text[m.end():end - 1]
        else:  # \boxed 5
            token = re.match(r"\s+([^\s$]+)", text[m.start(1):])
            if token:
                last = token.group(1).rstrip(".")
    if last is not None:
        return last.strip()
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    ans = matches[-1].group(1).strip().split("\n")[0]
    math = re.match(r"\$([^$]+)\$", ans)
    if math:
        ans = math.group(1)
    else:
        ans = re.split(r"\.(?:\s|$)", ans)[0]
    ans = ans.strip("$ ").strip()
    return ans or None


# ---------------------------------------------------------------------------------------------------------
# Normalisation

_UNIT_WORDS = (
    "units?", "square units?", "sq units?", "cubic units?", "degrees?", "cm", "centimeters?", "m", "meters?",
    "km", "kilometers?", "mm", "inch(?:es)?", "in", "feet", "foot", "ft", "yards?", "miles?", "mph", "seconds?",
    "sec", "s", "minutes?", "min", "hours?", "hrs?", "days?", "weeks?", "months?", "years?", "dollars?",
    "cents?", "pounds?", "lbs?", "ounces?", "oz", "grams?", "g", "kg", "liters?", "l", "ml", "gallons?",
    "people", "students?", "ways", "points?", "cups?", "pages?", "marbles?", "books?", "coins?", "boxes?",
    "sq ft", "square feet", "square inches", "square meters", "square centimeters",
    r"cm\^2", r"cm\^3", r"m\^2", r"m\^3", r"in\^2", r"ft\^2", "percent", "%",
)
_UNIT_RE = re.compile(r"^(.*?[\d}a-zA-Z)])\s*(?:" + "|".join(_UNIT_WORDS) + r")\.?$", re.IGNORECASE)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname|mathit)\s*\{")


def _unwrap_commands(s: str, pattern: re.Pattern) -> str:
    """Replaces \\cmd{X} by X for every match of pattern (which ends at the opening brace)."""
    while True:
        m = pattern.search(s)
        if not m:
            return s
        end = _balanced(s, m.end() - 1)
        if end is None:
            return s[:m.start()] + s[m.end():]
        s = s[:m.start()] + s[m.end():end - 1] + s[end:]


def normalize(ans: str) -> str:
    """A canonical string for an answer; equal strings mean equal answers (not conversely)."""
    if not isinstance(ans, str):
        raise TypeError(f"answer must be a str, got {type(ans).__name__}")
    s = ans.strip()
    s = s.replace("\n", " ")
    for a, b in (("\\$", ""), ("$", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        s = s.replace(a, b)
    boxed = extract_answer(s) if "\\boxed" in s or "\\fbox" in s else None
    if boxed is not None:
        s = boxed
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\(?:displaystyle|textstyle|!|,|;|:|quad|qquad| )", " ", s)
    s = s.replace("~", " ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    # Degrees, percent, dollars.
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\circ", "").replace("°", "").replace("\\degree", "")
    s = s.replace("\\%", "").replace("%", "")
    # \text{...}: a trailing text after a number is a unit; otherwise keep the words.
    m = re.match(r"^(.*[\d}])\s*\\(?:text|mbox|mathrm)\s*\{\s*([a-zA-Z][a-zA-Z .^{}0-9]*)\}\s*\.?$", s)
    if m and not re.fullmatch(r"[a-zA-Z]", m.group(2).strip()):
        s = m.group(1)
    s = _unwrap_commands(s, _TEXT_CMD_RE)
    s = s.strip()
    m = _UNIT_RE.match(s)
    if m and re.search(r"\d", m.group(1)):
        s = m.group(1)
    s = re.sub(r"\s*\.\s*$", "", s)  # trailing period
    # A leading "x =" (single letter or \theta-like name), but not a bare relation like "x = y = 3".
    s = re.sub(r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)\s*(?:=|\\in)\s*(?!.*=)", "", s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\{,\}", ",", s)
    # Thousands separators: 1,000,000 (only when every group is three digits).
    s = re.sub(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])", lambda m: m.group(1).replace(",", "") if
               _only_number_list(s) else m.group(1), s)
    # \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    s = re.sub(r"(?<![\d])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    s = re.sub(r"(\d+\.\d*?)0+(?![\d])", lambda m: m.group(1).rstrip("."), s)  # 2.50 -> 2.5, 3.0 -> 3
    if re.fullmatch(r"\(?[A-Ea-e]\)?", s):  # multiple choice
        s = s.strip("()").upper()
    if re.fullmatch(r"[a-zA-Z][a-zA-Z\s]*", s):
        s = s.lower()
    return s


def _only_number_list(s: str) -> bool:
    """True when commas in s can only be thousands separators (a single number like 1,234,567)."""
    return re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s) is not None


# ---------------------------------------------------------------------------------------------------------
# Structure: tuples, intervals, sets, lists, +-, matrices

_PAIRS = {"(": ")", "[": "]", "\\{": "\\}"}


def _split_top(s: str, sep: str) -> list[str]:
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        if s.startswith("\\{", i) or s[i] in "([{":
            depth += 1
        elif s.startswith("\\}", i) or s[i] in ")]}":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            parts.append("".join(cur))
            cur, i = [], i + len(sep)
            continue
        step = 2 if s.startswith(("\\{", "\\}"), i) else 1
        cur.append(s[i:i + step])
        i += step
    parts.append("".join(cur))
    return parts


def _brackets(s: str) -> tuple[str, str, str] | None:
    """(open, inner, close) when s is one bracketed group ('(..)', '[..)', '\\{..\\}', ...)."""
    for op in ("\\{", "(", "["):
        if s.startswith(op):
            break
    else:
        return None
    for cl in ("\\}", ")", "]"):
        if s.endswith(cl) and len(s) >= len(op) + len(cl):
            inner = s[len(op):len(s) - len(cl)]
            # The brackets must enclose everything: depth never returns to zero inside.
            depth = 0
            for ch in inner:
                depth += ch in "([{"
                depth -= ch in ")]}"
                if depth < 0:
                    return None
            return (op, inner, cl) if depth == 0 else None
    return None


def _matrix(s: str) -> list[list[str]] | None:
    m = re.fullmatch(r"\\begin\{[pbvB]?matrix\}(.*)\\end\{[pbvB]?matrix\}", s)
    if not m:
        return None
    return [[c for c in row.split("&")] for row in m.group(1).split("\\\\") if row]


def _expand_pm(s: str) -> list[str] | None:
    if s.count("\\pm") != 1:
        return None
    return [s.replace("\\pm", "+"), s.replace("\\pm", "-")]


def _equivalent(a: str, b: str, timeout_s: float, rel_tol: float, depth: int = 0) -> bool:
    if a == b:
        return True
    if depth > 4:
        return False
    ma, mb = _matrix(a), _matrix(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or [len(r) for r in ma] != [len(r) for r in mb]:
            return False
        return all(_equivalent(x, y, timeout_s, rel_tol, depth + 1)
                   for ra, rb in zip(ma, mb) for x, y in zip(ra, rb))
    pa, pb = _expand_pm(a), _expand_pm(b)
    if pa or pb:
        la = pa or _split_top(a, ",")
        lb = pb or _split_top(b, ",")
        return _same_multiset(la, lb, timeout_s, rel_tol, depth)
    for sep in ("\\cup",):
        la, lb = _split_top(a, sep), _split_top(b, sep)
        if len(la) > 1 or len(lb) > 1:
            return len(la) == len(lb) and all(_equivalent(x, y, timeout_s, rel_tol, depth + 1)
                                               for x, y in zip(la, lb))
    ba, bb = _brackets(a), _brackets(b)
    ia = _split_top(ba[1], ",") if ba else _split_top(a, ",")
    ib = _split_top(bb[1], ",") if bb else _split_top(b, ",")
    if len(ia) > 1 or len(ib) > 1:
        if ba and bb:
            if (ba[0], ba[2]) != (bb[0], bb[2]) or len(ia) != len(ib):
                return False
            if ba[0] == "\\{":
                return _same_multiset(ia, ib, timeout_s, rel_tol, depth)
            return all(_equivalent(x, y, timeout_s, rel_tol, depth + 1) for x, y in zip(ia, ib))
        if ba or bb:  # "(1,2)" against "1,2": a tuple written without its parentheses
            if (ba or bb)[0] != "(":
                return False
            return len(ia) == len(ib) and all(_equivalent(x, y, timeout_s, rel_tol, depth + 1)
                                              for x, y in zip(ia, ib))
        return _same_multiset(ia, ib, timeout_s, rel_tol, depth)  # "3,5,7": a list of solutions
    if ba and bb and ba[0] == "\\{" and bb[0] == "\\{":
        return _equivalent(ba[1], bb[1], timeout_s, rel_tol, depth + 1)
    if re.fullmatch(r"[a-z][a-z\s]*", a) or re.fullmatch(r"[a-z][a-z\s]*", b):
        return False  # words that differ after normalisation
    return _sympy_equal(a, b, timeout_s, rel_tol)


def _same_multiset(la: list[str], lb: list[str], timeout_s: float, rel_tol: float, depth: int) -> bool:
    if len(la) != len(lb):
        return False
    rest = list(lb)
    for x in la:
        for j, y in enumerate(rest):
            if _equivalent(x, y, timeout_s, rel_tol, depth + 1):
                del rest[j]
                break
        else:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# LaTeX -> sympy syntax


def _replace_cmd_args(s: str, cmd: str, nargs: int, fmt) -> str:
    """Replaces \\cmd{a}{b}... (nargs brace groups, innermost first) with fmt(*args)."""
    while True:
        idx = s.rfind("\\" + cmd)
        if idx < 0:
            return s
        pos, args = idx + len(cmd) + 1, []
        for _ in range(nargs):
            while pos < len(s) and s[pos] == " ":
                pos += 1
            if pos < len(s) and s[pos] == "{":
                end = _balanced(s, pos)
                if end is None:
                    raise ValueError(f"unbalanced braces in {s!r}")
                args.append(s[pos + 1:end - 1])
                pos = end
            elif pos < len(s):
                args.append(s[pos])
                pos += 1
            else:
                raise ValueError(f"\\{cmd} without argument in {s!r}")
        s = s[:idx] + fmt(*args) + s[pos:]


def latex_to_sympy(s: str) -> str:
    """A sympy-parsable string for a normalised LaTeX math answer; ValueError if it is not math."""
    if not isinstance(s, str):
        raise TypeError(f"expected a str, got {type(s).__name__}")
    s = normalize(s) if ("$" in s or " " in s) else s
    # A mixed number, as MATH writes them: 1\frac{4}{5} is 9/5.
    s = re.sub(r"(?<![\d.])(\d+)\\frac\{(\d+)\}\{(\d+)\}", r"(\1+\2/\3)", s)
    s = re.sub(r"\\sqrt\[([^\]]+)\]", r"\\root{\1}", s)
    s = _replace_cmd_args(s, "frac", 2, lambda a, b: f"(({a})/({b}))")
    s = _replace_cmd_args(s, "root", 2, lambda n, x: f"(({x})**(1/({n})))")
    s = _replace_cmd_args(s, "sqrt", 1, lambda x: f"sqrt({x})")
    for a, b in (("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\pi", "pi"), ("\\infty", "oo"),
                 ("\\ln", "log"), ("\\log", "log"), ("\\sin", "sin"), ("\\cos", "cos"), ("\\tan", "tan"),
                 ("\\cot", "cot"), ("\\sec", "sec"), ("\\csc", "csc"), ("\\arcsin", "asin"),
                 ("\\arccos", "acos"), ("\\arctan", "atan"), ("\\exp", "exp"), ("\\theta", "theta"),
                 ("\\alpha", "alpha"), ("\\beta", "beta")):
        s = s.replace(a, b)
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    # sympy's parser evaluates Python: refuse anything beyond arithmetic on names (no dunders, no attributes).
    if "\\" in s or re.search(r"[=<>;&|!?\"'#@`\[\]]|__|[A-Za-z_)]\s*\.", s):
        raise ValueError(f"not a plain math expression: {s!r}")
    s = re.sub(r"(\d),(\d)", r"\1\2", s) if re.fullmatch(r"[\d,.]+", s) else s
    if "," in s:
        raise ValueError(f"not a single expression: {s!r}")
    return s


# ---------------------------------------------------------------------------------------------------------
# The sympy worker: a separate process, so a runaway simplification is killed, not waited for.

_WORKER_SRC = r'''
import json, sys
import sympy
from sympy.parsing.sympy_parser import (parse_expr, standard_transformations,
                                        implicit_multiplication_application)
T = standard_transformations + (implicit_multiplication_application,)
NS = {"pi": sympy.pi, "oo": sympy.oo, "E": sympy.E, "sqrt": sympy.sqrt, "log": sympy.log}
def equal(a, b, tol):
    x = parse_expr(a, local_dict=dict(NS), transformations=T)
    y = parse_expr(b, local_dict=dict(NS), transformations=T)
    if x == y:
        return True
    if x.free_symbols == set() and y.free_symbols == set():
        if x.has(sympy.oo, -sympy.oo, sympy.zoo) or y.has(sympy.oo, -sympy.oo, sympy.zoo):
            return bool(sympy.simplify(x - y) == 0) if x.is_finite and y.is_finite else x == y
        vx, vy = complex(sympy.N(x, 30)), complex(sympy.N(y, 30))
        return abs(vx - vy) <= tol * max(1.0, abs(vy))
    if sympy.simplify(x - y) == 0:
        return True
    return bool(x.equals(y))
for line in sys.stdin:
    req = json.loads(line)
    try:
        out = equal(req["a"], req["b"], req["tol"])
    except Exception as e:  # a parse or evaluation failure means "not shown equal"
        out = None
    sys.stdout.write(json.dumps({"eq": out}) + "\n")
    sys.stdout.flush()
'''


class _SympyWorker:
    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-I", "-c", _WORKER_SRC], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})

    def equal(self, a: str, b: str, timeout_s: float, rel_tol: float) -> bool | None:
        """True/False from sympy; None if it could not decide within timeout_s (or could not parse)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
                timeout_s += 10.0  # first call: the import of sympy
            proc = self._proc
            proc.stdin.write(json.dumps({"a": a, "b": b, "tol": rel_tol}) + "\n")
            proc.stdin.flush()
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                ready = select.select([proc.stdout], [], [], max(left, 0))[0] if left > 0 else []
                if ready:
                    line = proc.stdout.readline()
                    if not line:  # the worker died (memory?): restart next time
                        self._proc = None
                        return None
                    return json.loads(line)["eq"]
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    self._proc = None
                    return None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
                self._proc = None


_WORKER = _SympyWorker()


def _sympy_equal(a: str, b: str, timeout_s: float, rel_tol: float) -> bool:
    try:
        sa, sb = latex_to_sympy(a), latex_to_sympy(b)
    except ValueError:
        return False
    if sa == sb:
        return True
    return bool(_WORKER.equal(sa, sb, timeout_s, rel_tol))


# ---------------------------------------------------------------------------------------------------------
# Public API


def is_equivalent(pred: str | None, ref: str, *, timeout_s: float = 2.0, rel_tol: float = 1e-6) -> bool:
    """Whether answer pred means the same as reference answer ref (both LaTeX-ish strings)."""
    if pred is None:
        return False
    if not isinstance(pred, str) or not isinstance(ref, str):
        raise TypeError(f"answers must be str, got {type(pred).__name__} and {type(ref).__name__}")
    if timeout_s <= 0 or rel_tol < 0:
        raise ValueError(f"timeout_s must be > 0 and rel_tol >= 0, got {timeout_s}, {rel_tol}")
    a, b = normalize(pred), normalize(ref)
    if not a or not b:
        return a == b
    return _equivalent(a, b, timeout_s, rel_tol)


def grade(text: str, ref: str, **kwargs: float) -> bool:
    """Extracts the final answer from a solution text and compares it with the reference answer."""
    return is_equivalent(extract_answer(text), ref, **kwargs)

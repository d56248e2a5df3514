"""A synthetic verification task with exact gold labels: multi-step arithmetic and algebra, planted errors.

Three problem families, each solved step by step with sympy-checked arithmetic:
  arith     evaluate an integer expression one operation per step ("Compute 4 + 5 = 9.")
  linear    solve a x + b = c x + d (integer root) by moving terms and dividing
  fraction  simplify a fraction p/q through its gcd
With probability `p_error` one step gets a planted arithmetic error (off by a little, off by ten, digits swapped, or
the wrong operation); later steps carry the wrong value forward consistently, as a real solver would. The label is
the 0-based index of the first wrong step, or -1 (ProcessBench's convention).

Each example also carries the verifier's gold output: a chain in ThinkPRM's shape (prmkern.verify.formats.PRMKERN,
the text after its "Let's verify step by step:" prefix) that recomputes each step's claim, restates what the
solution wrote and compares the two before its verdict ("Step 2: 3 times 9 is 27. The solution says 28. Compare 28
with 27: mismatch. The step is \\boxed{incorrect}"), stops at the first wrong step, and closes with "Is the
solution correct? Yes/No".

`write_jsonl` writes ProcessBench's record format (id, generator, problem, steps, label, final_answer_correct) plus
`answer` (the gold final answer, for grading rollouts) and `chain` (the gold verification text).

It does not: render prompts (prmkern.verify.formats does), tokenize, or produce anything but integer arithmetic.
Everything is deterministic from the seed (Python's `random.Random`, no global state).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Callable

import sympy

FAMILIES = ("arith", "linear", "fraction")
FINAL_QUESTION = "Is the solution correct?"


@dataclass
class Check:
    """One recomputation inside a step: `expr` evaluates to `true`; the solution wrote `claimed`."""
    expr: str
    true: str
    claimed: str

    @property
    def ok(self) -> bool:
        return self.true == self.claimed


@dataclass
class Example:
    id: str
    generator: str
    problem: str
    steps: list[str]
    label: int
    final_answer_correct: bool
    answer: str
    chain: str = ""
    checks: list[list[Check]] = field(default_factory=list, repr=False)

    def record(self) -> dict:
        """The JSONL record: ProcessBench's fields plus `answer` and `chain`."""
        d = asdict(self)
        d.pop("checks")
        return d


# ---------------------------------------------------------------------------------------------------------------
# Planted errors


def _corrupt(value: int, rng: random.Random, wrong_op: int | None = None) -> int:
    """A plausible wrong result for `value` (never equal to it). `wrong_op`: the result of the wrong operation."""
    choices: list[Callable[[], int]] = [
        lambda: value + rng.choice([-2, -1, 1, 2]),
        lambda: value + rng.choice([-10, 10]),
    ]
    s = str(abs(value))
    if len(s) >= 2 and s[-1] != s[-2]:
        swapped = int(s[:-2] + s[-1] + s[-2])
        choices.append(lambda: swapped if value >= 0 else -swapped)
    if wrong_op is not None and wrong_op != value:
        choices.append(lambda: wrong_op)
    for _ in range(10):
        out = rng.choice(choices)()
        if out != value and (value < 0 or out >= 0):
            return out
    return value + 1


def _fmt(v: int) -> str:
    return str(v)


# ---------------------------------------------------------------------------------------------------------------
# Family: arith. A random expression tree over small integers, evaluated innermost-first.

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_WRONG_OP = {"+": "-", "-": "+", "*": "+"}


def _arith_tree(rng: random.Random, n_ops: int):
    """A tree of n_ops binary operations with non-negative intermediate values, as nested tuples (op, left, right)
    or int leaves. Products keep one side a single digit so the arithmetic stays small."""
    if n_ops == 0:
        return rng.randint(2, 20)
    left_ops = rng.randint(0, n_ops - 1)
    left, right = _arith_tree(rng, left_ops), _arith_tree(rng, n_ops - 1 - left_ops)
    lv, rv = _arith_value(left), _arith_value(right)
    ops = ["+", "-"] if lv >= rv else ["+"]
    if (isinstance(right, int) and right <= 9 and lv <= 99) or (isinstance(left, int) and left <= 9 and rv <= 99):
        ops.append("*")
    return (rng.choice(ops), left, right)


def _arith_value(t) -> int:
    return t if isinstance(t, int) else _OPS[t[0]](_arith_value(t[1]), _arith_value(t[2]))


def _arith_text(t, parent: str | None = None, side: str = "") -> str:
    if isinstance(t, int):
        return str(t)
    op = t[0]
    s = f"{_arith_text(t[1], op, 'l')} {op} {_arith_text(t[2], op, 'r')}"
    need = parent is not None and (parent == "*" and op != "*" or parent == "-" and side == "r" and op != "*")
    return f"({s})" if need else s


def _arith(rng: random.Random, error_at: int | None) -> tuple[str, list[str], list[list[Check]], str, str]:
    tree = _arith_tree(rng, rng.randint(2, 4))
    problem = f"Compute ${_arith_text(tree)}$."
    steps: list[str] = []
    checks: list[list[Check]] = []
    n_ops = [0]

    def count(t) -> int:
        return 0 if isinstance(t, int) else 1 + count(t[1]) + count(t[2])

    total = count(tree)
    if error_at is not None:
        error_at = min(error_at, total - 1)

    def walk(t) -> int:
        """Evaluates post-order as the solution writes it (wrong values propagate); returns the solution's value."""
        if isinstance(t, int):
            return t
        a, b = walk(t[1]), walk(t[2])
        true = _OPS[t[0]](a, b)
        claimed = true
        if n_ops[0] == error_at:
            claimed = _corrupt(true, rng, _OPS[_WRONG_OP[t[0]]](a, b))
        expr = f"{a} {t[0]} {b}"
        steps.append(f"Compute {expr} = {claimed}.")
        checks.append([Check(expr, _fmt(true), _fmt(claimed))])
        n_ops[0] += 1
        return claimed

    final = walk(tree)
    steps[-1] += f" The answer is $\\boxed{{{final}}}$."
    return problem, steps, checks, str(_arith_value(tree)), str(final)


# ---------------------------------------------------------------------------------------------------------------
# Family: linear. a x + b = c x + d with a > c and an integer root.


def _lin(coef: int, const: int) -> str:
    """'3x + 5', 'x - 2', '4x' (coef != 0)."""
    head = "x" if coef == 1 else f"{coef}x"
    if const == 0:
        return head
    return f"{head} + {const}" if const > 0 else f"{head} - {-const}"


def _linear(rng: random.Random, error_at: int | None) -> tuple[str, list[str], list[list[Check]], str, str]:
    c = rng.randint(1, 9)
    k = rng.randint(1, 9)          # a - c
    a = c + k
    x = rng.randint(-9, 12)
    b = rng.randint(1, 30)
    d = k * x + b                  # so (a - c) x = d - b has root x
    problem = f"Solve for $x$: ${_lin(a, b)} = {'x' if c == 1 else f'{c}x'} + {d}$." if d >= 0 else \
        f"Solve for $x$: ${_lin(a, b)} = {'x' if c == 1 else f'{c}x'} - {-d}$."
    # Step 1: subtract c x: (a - c) x + b = d
    k_claim = k if error_at != 0 else _corrupt(k, rng, a + c)
    if k_claim == 0:
        k_claim = k + 1
    s1 = f"Subtract {'x' if c == 1 else f'{c}x'} from both sides: ${_lin(k_claim, b)} = {d}$."
    c1 = [Check(f"{a}x - {c}x", f"{k}x", f"{k_claim}x")]
    # Step 2: subtract b: k x = d - b
    r_true = d - b
    r_claim = r_true if error_at != 1 else _corrupt(r_true, rng, d + b)
    s2 = f"Subtract {b} from both sides: ${'x' if k_claim == 1 else f'{k_claim}x'} = {r_claim}$."
    c2 = [Check(f"{d} - {b}", _fmt(r_true), _fmt(r_claim))]
    # Step 3: divide by k (the claimed k); the solution keeps integers, so a wrong quotient is rounded down
    q_true = sympy.Rational(r_claim, k_claim)
    q_claim = q_true if error_at != 2 else sympy.Integer(_corrupt(int(sympy.floor(q_true)), rng))
    steps = [s1, s2]
    checks = [c1, c2]
    if k_claim != 1:
        steps.append(f"Divide both sides by {k_claim}: $x = {_q(q_claim)}$.")
        checks.append([Check(f"{r_claim} / {k_claim}", _q(q_true), _q(q_claim))])
    else:
        q_claim = sympy.Integer(r_claim)
    steps[-1] += f" The answer is $\\boxed{{{_q(q_claim)}}}$."
    return problem, steps, checks, str(x), _q(q_claim)


def _q(v) -> str:
    v = sympy.Rational(v)
    return str(v.p) if v.q == 1 else f"{v.p}/{v.q}"


# ---------------------------------------------------------------------------------------------------------------
# Family: fraction. Simplify (g p) / (g q) with gcd(p, q) = 1.


def _fraction(rng: random.Random, error_at: int | None) -> tuple[str, list[str], list[list[Check]], str, str]:
    while True:
        p, q = rng.randint(1, 9), rng.randint(2, 12)
        if math.gcd(p, q) == 1 and p != q:
            break
    g = rng.randint(2, 9)
    num, den = g * p, g * q
    problem = f"Simplify the fraction $\\frac{{{num}}}{{{den}}}$."
    g_claim = g
    if error_at == 0:
        g_claim = max(2, _corrupt(g, rng))
        g_claim = g + 1 if g_claim == g else g_claim
    s1 = f"The greatest common divisor of {num} and {den} is {g_claim}."
    c1 = [Check(f"gcd({num}, {den})", str(g), str(g_claim))]
    # the solution divides by its (possibly wrong) gcd; a non-exact division is written rounded down
    n_claim = num // g_claim
    d_claim = den // g_claim
    if error_at == 1:
        n_claim = _corrupt(n_claim, rng)
    if error_at == 2:
        d_claim = _corrupt(d_claim, rng)
    s2 = f"Divide the numerator: {num} / {g_claim} = {n_claim}."
    c2 = [Check(f"{num} / {g_claim}", _q(sympy.Rational(num, g_claim)), str(n_claim))]
    s3 = (f"Divide the denominator: {den} / {g_claim} = {d_claim}. "
          f"The answer is $\\boxed{{\\frac{{{n_claim}}}{{{d_claim}}}}}$.")
    c3 = [Check(f"{den} / {g_claim}", _q(sympy.Rational(den, g_claim)), str(d_claim))]
    return problem, [s1, s2, s3], [c1, c2, c3], f"\\frac{{{p}}}{{{q}}}", f"\\frac{{{n_claim}}}{{{d_claim}}}"


_FAMILY_FNS = {"arith": _arith, "linear": _linear, "fraction": _fraction}
_MAX_STEPS = {"arith": 4, "linear": 3, "fraction": 3}


# ---------------------------------------------------------------------------------------------------------------
# Labels and chains


def first_error(checks: list[list[Check]]) -> int:
    """0-based index of the first step with a wrong check, or -1."""
    for i, cs in enumerate(checks):
        if not all(c.ok for c in cs):
            return i
    return -1


_SPOKEN = {" + ": " plus ", " - ": " minus ", " * ": " times ", " / ": " divided by "}


def spoken(expr: str) -> str:
    """An expression as the chain says it: "10 + 18" -> "10 plus 18", "gcd(48, 60)" -> "the gcd of 48 and 60"."""
    if expr.startswith("gcd("):
        a, b = expr[4:-1].split(", ")
        return f"the gcd of {a} and {b}"
    for sym, word in _SPOKEN.items():
        if sym in expr:
            a, b = expr.split(sym, 1)
            return f"{a}{word}{b}"
    return expr


def gold_chain(checks: list[list[Check]]) -> str:
    """The verifier's gold output, as it continues after PRMKERN's prefix ("...Let's verify step by step:").
    Starts with a newline; one line per judged step, stops at the first wrong step, then the final Yes/No.

    Each step is judged in three moves, each one local, so that a small model can learn them:
      Step 3: 10 plus 18 is 28. The solution says 82. Compare 82 with 28: mismatch. The step is \\boxed{incorrect}
    recompute the claim from its operands, written in words ("plus", not the prompt's "+"), then copy the value the
    solution wrote, then compare two numbers that now sit side by side, so that the verdict token follows its
    evidence. The wording matters to a small model (README, Training): when the recomputation repeated the prompt's
    "10 + 18 =", the model learned to continue it with the prompt's own (claimed) value instead of computing it;
    when the chain gave the verdict cue before restating the claim, it never compared them."""
    lines = [""]
    label = first_error(checks)
    for i, cs in enumerate(checks):
        parts = [f"{spoken(c.expr)} is {c.true}. The solution says {c.claimed}. Compare {c.claimed} with {c.true}: "
                 f"{'match' if c.ok else 'mismatch'}." for c in cs]
        verdict = "correct" if all(c.ok for c in cs) else "incorrect"
        lines.append(f"Step {i + 1}: {' '.join(parts)} The step is \\boxed{{{verdict}}}")
        if verdict == "incorrect":
            break
    lines.append(f"{FINAL_QUESTION} {'Yes' if label == -1 else 'No'}")
    return "\n".join(lines)


def _answers_equal(a: str, b: str) -> bool:
    """Integer / rational answers compare by value; a fraction to simplify must be written in lowest terms, so
    `\\frac{}{}` answers compare as written."""
    if a.startswith("\\frac") or b.startswith("\\frac"):
        return a == b
    return sympy.Rational(a) == sympy.Rational(b)


def make_example(rng: random.Random, idx: int, *, family: str | None = None, p_error: float = 0.5,
                 prefix: str = "syn") -> Example:
    """One example drawn from `rng` (the caller's stream, so a dataset is one deterministic sequence)."""
    family = family or rng.choices(FAMILIES, weights=(0.5, 0.3, 0.2))[0]
    if family not in _FAMILY_FNS:
        raise ValueError(f"family={family!r}; accepted: {FAMILIES}")
    error_at = rng.randrange(_MAX_STEPS[family]) if rng.random() < p_error else None
    problem, steps, checks, gold, final = _FAMILY_FNS[family](rng, error_at)
    label = first_error(checks)
    final_ok = _answers_equal(final, gold)
    return Example(id=f"{prefix}-{idx}", generator=f"synthetic-{family}", problem=problem, steps=steps, label=label,
                   final_answer_correct=bool(final_ok), answer=gold, chain=gold_chain(checks), checks=checks)


def make_dataset(n: int, seed: int, *, p_error: float = 0.5, prefix: str | None = None,
                 families: tuple[str, ...] | None = None) -> list[Example]:
    """n examples, deterministic from `seed`. Different seeds give disjoint streams for train / held-out sets (the
    held-out evaluation also drops any problem text seen in training; see train/evaluate.py)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}; accepted: an int >= 0")
    if not 0.0 <= p_error <= 1.0:
        raise ValueError(f"p_error={p_error!r}; accepted: a float in [0, 1]")
    rng = random.Random(seed)
    prefix = prefix or f"syn{seed}"
    fams = families or None
    return [make_example(rng, i, family=rng.choice(fams) if fams else None, p_error=p_error, prefix=prefix)
            for i in range(n)]


def write_jsonl(examples: list[Example], path: str) -> None:
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex.record()) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a synthetic verification set in ProcessBench's JSONL format.")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-error", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    write_jsonl(make_dataset(args.n, args.seed, p_error=args.p_error), args.out)

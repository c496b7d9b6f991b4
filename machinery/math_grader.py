"""The MATH grader of the authors' evaluation (github.com/CERT-Lab/lora-sb: instruction_tuning_eval/MATH_eval.py,
utils.py and grader.py, which follow MetaMath's eval_math.py and util.py, after Hendrycks' math_equivalence): the
reference answer (the last \\boxed{...} of the reference solution), the predicted answer, strip_string's
normalization, the lenient comparison (math_equal, is_equiv) and score_math.

MATH is evaluated with GSM8K's prompt and stop strings (data.py) and a budget of 512 new tokens. Every quirk of theirs
that changes a number is kept and named where it happens, except the one that makes wrong answers count as correct
(is_equiv's fallback), which is fixed and measured beside the correct score.
Standard library only, and sympy (installed with torch) for the symbolic comparison, imported where it is used.
"""

import math
import re
import signal
import threading
from contextlib import contextmanager

ANSWER_PREFIX = "The answer is: "  # MATH_eval.py splits on the same prefix as GSM8K's evaluation
MATH_MAX_PLAIN_EXPRESSION = 100  # characters; longer answers are not handed to sympy (see symbolic_equal)
MATH_MAX_NESTING = 50  # levels of brackets that math_equal compares part by part (see math_equal)
SYMPY_SECONDS = 0.5  # per symbolic comparison; a slower one compares unequal (see symbolic_equal)
PLAIN_CHARACTERS_RE = re.compile(r"[\dA-Za-z.+\-*/()]+")  # see is_plain_expression
BARE_POINT_RE = re.compile(r"\.(?!\d)")  # a "." with no digit after it


def last_boxed(text: str) -> str | None:
    r"""The last "\boxed{...}" of text with its braces balanced (or, when text has no \boxed, the last "\fbox{...}"),
    as utils.last_boxed_only_string; None when there is none or its braces do not close. The scan counts braces from
    the command on, so "\boxed{\frac{1}{2}}" is returned whole."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def reference_answer(solution: str) -> str | None:
    r"""The reference answer of a MATH solution: the inside of its last \boxed{...}, as MATH_eval.py's
    remove_boxed(last_boxed_only_string(solution)); None without one (an \fbox{...} or a "\boxed 5" without braces
    gives None, as in theirs)."""
    boxed = last_boxed(solution)
    if boxed is None or not boxed.startswith("\\boxed{"):
        return None
    return boxed[len("\\boxed{"):-1]


def extract_math_answer(completion: str) -> str | None:
    """The predicted MATH answer, as MATH_eval.py's process_results reads it; None when invalid.

    Take the text after the last "The answer is: " (none: invalid), keep what comes before its first ".\\n", strip it,
    remove one trailing period and strip again: "The answer is: \\frac{1}{2}.\\nDone" gives "\\frac{1}{2}"."""
    parts = completion.split(ANSWER_PREFIX)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    return answer.removesuffix(".").strip()


def remove_right_units(text: str) -> str:
    r"""Drop a unit written as "\text{ ...}" and everything after it: "5\text{ cm}" becomes "5". Theirs asserts there is
    only one; a second one raises ValueError here (see is_equiv)."""
    parts = text.split("\\text{ ")
    if len(parts) > 2:
        raise ValueError(f"more than one '\\text{{ ' unit in {text!r}")
    return parts[0]


def fix_sqrt(text: str) -> str:
    r"""Brace a one-character square root argument: "\sqrt3" becomes "\sqrt{3}", "\sqrt{3}" is kept. A "\sqrt" with
    nothing after it raises ValueError, where theirs raises IndexError."""
    parts = text.split("\\sqrt")
    fixed = parts[0]
    for part in parts[1:]:
        if not part:
            raise ValueError(f"'\\sqrt' without an argument in {text!r}")
        fixed += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return fixed


def fix_fracs(text: str) -> str:
    r"""Brace one-character fraction arguments: "\frac12" becomes "\frac{1}{2}", "\frac1{72}" becomes "\frac{1}{72}";
    "\frac{a}b" is kept (the second argument is only braced with the first). A "\frac" followed by a single character
    leaves the whole text unchanged, and one followed by nothing raises ValueError (theirs: IndexError)."""
    parts = text.split("\\frac")
    fixed = parts[0]
    for part in parts[1:]:
        if not part:
            raise ValueError(f"'\\frac' without arguments in {text!r}")
        if part[0] == "{":
            fixed += "\\frac" + part
        elif len(part) < 2:
            return text
        elif part[1] != "{":
            fixed += "\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            fixed += "\\frac{" + part[0] + "}" + part[1:]
    return fixed


def fix_a_slash_b(text: str) -> str:
    r"""Write an integer ratio as a fraction: "3/4" becomes "\frac{3}{4}"; a text that is not exactly int/int in the
    canonical form ("03/4", "+3/4") is kept. A side int() cannot read ("x/4", "\pi/2") raises ValueError: theirs catches
    only the assertion (Hendrycks' original returned the text), so such an answer takes is_equiv's fallback path."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    a, b = int(parts[0]), int(parts[1])
    return f"\\frac{{{a}}}{{{b}}}" if text == f"{a}/{b}" else text


def strip_string(text: str) -> str:
    r"""utils.strip_string, the normalization both answers get before they are compared, rule by rule in its order:
    drop line breaks, "\!" and "\left" / "\right"; "\\" becomes "\"; tfrac and dfrac become frac; drop degrees
    ("^{\circ}", "^\circ"), "\$", a "\text{ unit}" on the right and "\%" (twice); " ." and "{." get a 0 and so does a
    leading "."; a short left side "k = " is dropped (at most 2 characters before the only "="); sqrt arguments are
    braced; spaces are dropped; fraction arguments are braced; "0.5" becomes "\frac{1}{2}"; an integer ratio a/b
    becomes "\frac{a}{b}". Raises ValueError where theirs raises (remove_right_units, fix_sqrt, fix_fracs,
    fix_a_slash_b)."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "")
    text = remove_right_units(text)
    # theirs removes "\%" twice (replace("\\%", "") then replace("\%", ""), the same string), so a "\%" that the first
    # removal brings together goes as well: 5\\%% (what 5\\\%% becomes above) gives 5\%, then 5
    text = text.replace("\\%", "").replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = fix_sqrt(text).replace(" ", "")
    text = fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return fix_a_slash_b(text)


def is_number(text: str) -> bool:
    """grader.py's is_digit: float() reads it once commas are removed ("1,000", "2.5e3", "inf" and "1_0" all do)."""
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def is_plain_expression(text: str) -> bool:
    r"""Whether text is a plain expression for symbolic_equal: numbers ("5", "5.25", ".25"), names ("x", "sqrt"),
    + - * / and parentheses, one after another in any order and at least one. That is: text is made of those characters
    only, and every "." is followed by a digit ("1.2.3" reads as "1.2" then ".3"; "5." and "1..2" are not plain).

    Two scans, each linear in the length of text. The one pattern this replaces, r"(?:\d*\.?\d+|[A-Za-z]+|[-+*/()])+",
    accepts exactly the same strings, but its nested repetitions try every way of splitting a run of letters or digits
    before rejecting a text that ends in any other character: "a" * 26 + "," took 13 s, and each further letter doubled
    that. \d is any Unicode digit, as in that pattern."""
    return PLAIN_CHARACTERS_RE.fullmatch(text) is not None and BARE_POINT_RE.search(text) is None


class SympyTimeout(BaseException):
    """Raised into sympy when a comparison runs out of time: a BaseException, so no `except Exception` inside sympy
    swallows it."""


@contextmanager
def time_limit(seconds: float):
    """Raise SympyTimeout inside the block after `seconds`, and again every 50 ms until it ends (should a bare
    `except:` swallow one), by SIGALRM. POSIX and the main thread only: elsewhere (Windows, a worker thread) the block
    runs unbounded, and the length and character checks of symbolic_equal are its only bound."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise SympyTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def symbolic_equal(a: str, b: str) -> bool:
    """grader.py's symbolic_equal: both read by sympy's parse_expr, then equal when simplify(a - b) == 0 or when their
    numerical values agree within rel_tol 1e-3.

    Theirs first tries sympy's parse_latex, but their pinned environment (requirements.txt: sympy 1.13.1 and no
    antlr4-python3-runtime, which parse_latex needs) cannot parse LaTeX, so every answer went to parse_expr; LaTeX is
    not parsed here either, so "\\frac{1}{2}" and "0.5" are equal only through strip_string's rules. parse_expr
    evaluates its input as Python with all of sympy and Python's builtin functions in scope, which is unsafe on a
    model's output (e.g. "breakpoint()") and can hang (e.g. "9**9**9**9"). Here it reads only plain expressions of at
    most MATH_MAX_PLAIN_EXPRESSION characters: numbers, names, + - * / and parentheses, no "**". Nothing but sqrt and
    pi is in scope (any other name is a symbol or an undefined function) and no builtin is. Anything else compares
    unequal; theirs differs there only on answers with "**", "^" (which parse_expr reads as XOR) or other sympy names.
    The length is checked before anything else: sympy never sees a longer text. Even so, short plain expressions can
    keep simplify busy for minutes ("(a+b+c)*(d+e+f)*...*(v+w+x)", 63 characters: 54 s): the comparison has
    SYMPY_SECONDS (0.5 s), then compares unequal, as theirs does with its timeout option (1 s, in a subprocess).
    sympy is installed with torch; it is imported here, the one place it is used."""
    if not all(len(s) <= MATH_MAX_PLAIN_EXPRESSION and "**" not in s and is_plain_expression(s) for s in (a, b)):
        return False
    import sympy
    from sympy.parsing.sympy_parser import parse_expr

    def parse(s):
        scope = {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational, "Symbol": sympy.Symbol,
                 "Function": sympy.Function, "sqrt": sympy.sqrt, "pi": sympy.pi, "__builtins__": {}}
        return parse_expr(s, global_dict=scope)

    # every step may raise on odd input, which means "not equal", as theirs catches everything; RecursionError too (an
    # Exception), should sympy's recursive parsing or simplification run out of stack (see math_equal's depth bound)
    try:
        with time_limit(SYMPY_SECONDS):
            try:
                x, y = parse(a), parse(b)
            except Exception:
                return False
            try:
                if sympy.simplify(x - y) == 0:
                    return True
            except Exception:
                pass
            try:
                return math.isclose(sympy.N(x), sympy.N(y), rel_tol=1e-3)
            except Exception:
                return False
    except SympyTimeout:
        return False


def wrapped(text: str, pair: str) -> bool:
    """Whether text starts with pair[0] and ends with pair[1], e.g. pair "()"."""
    return text.startswith(pair[0]) and text.endswith(pair[1])


def math_equal(prediction: str, reference: str, depth: int = 0) -> bool:
    """grader.py's math_equal (include_percentage, is_close, no timeout), on two strings:

    1. Both numbers (is_number): equal when the prediction is within rel_tol 1e-4 of reference / 100, reference or
       reference * 100 (the GSM8K leniency), else not equal.
    2. An empty prediction is not equal.
    3. Equal when the two agree once brackets are ignored: if the prediction is wrapped in [] (and the reference does
       not start with "(") or in () (and the reference does not start with "["), both lose their outer [ ] ( )
       characters; then every {, }, ( and ) is removed from both. So "(1,2)" equals "1,2" and "{1,2}", but not
       "[1,2]"; and "\\frac{12}{3}" equals "\\frac{1}{23}" (a leniency of theirs, kept).
    4. Both wrapped in [] or both in (): equal when they have as many comma-separated parts, each equal by math_equal
       one level deeper (depth counts the levels). Below MATH_MAX_NESTING levels the parts are not compared: theirs
       recurses without a bound, so an answer nested in a few hundred brackets, against a reference nested as deep
       ("(" * 400 + "1" + ")" * 400 against the same with 2), raised RecursionError out of the grader. A MATH answer
       is nested a few levels at most, and the bound keeps the stack shallow where sympy is called (symbolic_equal).
    5. symbolic_equal."""
    if is_number(prediction) and is_number(reference):
        p, r = float(prediction.replace(",", "")), float(reference.replace(",", ""))
        return any(math.isclose(g, p, rel_tol=1e-4) for g in (r / 100, r, r * 100))
    if not prediction:
        return False
    prediction, reference = prediction.strip(), reference.strip()
    pred_bare, ref_bare = prediction, reference
    if (wrapped(prediction, "[]") and not reference.startswith("(")) or \
            (wrapped(prediction, "()") and not reference.startswith("[")):
        pred_bare, ref_bare = pred_bare.strip("[]()"), ref_bare.strip("[]()")
    drop_brackets = str.maketrans("", "", "{}()")
    if pred_bare.translate(drop_brackets) == ref_bare.translate(drop_brackets):
        return True
    if any(wrapped(prediction, pair) and wrapped(reference, pair) for pair in ("[]", "()")):
        pred_parts, ref_parts = prediction[1:-1].split(","), reference[1:-1].split(",")
        if depth < MATH_MAX_NESTING and len(pred_parts) == len(ref_parts) and \
                all(math_equal(p, r, depth + 1) for p, r in zip(pred_parts, ref_parts)):
            return True
    return symbolic_equal(prediction, reference)


def is_equiv(prediction: str, reference: str, authors_fallback: bool = False) -> bool:
    """utils.is_equiv: both answers normalized by strip_string, then equal when math_equal or string equality says so.

    When strip_string raises (two units, a "\\sqrt" or "\\frac" with nothing after it, a ratio like "x/4"), theirs
    evaluates math_equal(prediction, prediction): the prediction against itself, true for any non-empty prediction, so
    every such answer counts as correct and MATH scores are inflated. Here the raw answers are compared instead
    (math_equal(prediction, reference), what the line evidently meant; Hendrycks' original compared the strings);
    authors_fallback=True reproduces theirs, to measure what it changes."""
    try:
        normalized_prediction, normalized_reference = strip_string(prediction), strip_string(reference)
    except ValueError:
        other = prediction if authors_fallback else reference
        return math_equal(prediction, other) or prediction == reference
    return (math_equal(normalized_prediction, normalized_reference)
            or normalized_prediction == normalized_reference)


def normalizes(*answers: str) -> bool:
    """Whether strip_string accepts every answer (is_equiv's fallback, the authors' or ours, is then not taken)."""
    try:
        for answer in answers:
            strip_string(answer)
    except ValueError:
        return False
    return True


def score_math(completions: list[str], references: list[str]) -> dict:
    """MATH accuracy of generated completions (already cut at the stop strings) against reference answers, scored
    correctly, with what the authors' is_equiv fallback would have given beside it.

    Returns accuracy, correct, invalid (completions without "The answer is: "; they count as wrong) and total;
    accuracy_authors_fallback and changed_by_authors_fallback (the number of answers whose verdict it flips); and per
    completion, in order: extracted (None when invalid), is_correct and is_correct_authors_fallback (bools)."""
    if len(completions) != len(references) or not references:
        raise ValueError(f"need as many completions as reference answers, at least one; got {len(completions)} "
                         f"and {len(references)}")
    preds = [extract_math_answer(c) for c in completions]
    hits = [p is not None and is_equiv(p, r) for p, r in zip(preds, references)]
    # the fallback differs only where strip_string raises: elsewhere the verdict is hits', not compared a second time
    authors = [h if p is None or normalizes(p, r) else is_equiv(p, r, authors_fallback=True)
               for p, r, h in zip(preds, references, hits)]
    total = len(references)
    return {"accuracy": sum(hits) / total, "correct": sum(hits), "invalid": sum(p is None for p in preds),
            "total": total, "accuracy_authors_fallback": sum(authors) / total,
            "changed_by_authors_fallback": sum(a != h for a, h in zip(authors, hits)),
            "extracted": preds, "is_correct": hits, "is_correct_authors_fallback": authors}

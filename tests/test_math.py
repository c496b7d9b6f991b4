"""Tests of machinery/math_grader.py (the authors' MATH_eval.py, utils.py and grader.py): the reference and predicted
answers, strip_string rule by rule, is_equiv and the authors' fallback, scoring, and hostile answers (each graded
quickly, without an exception)."""

import itertools
import re
import sys
import time
from contextlib import contextmanager

import pytest

from machinery import math_grader
from machinery.math_grader import (MATH_MAX_NESTING, extract_math_answer, is_equiv, is_plain_expression, last_boxed,
                                    math_equal, reference_answer, score_math, strip_string, symbolic_equal)


# -----------------------------------------------------------------------------
# answers


def test_reference_answer_is_the_inside_of_the_last_boxed_with_nested_braces():
    solution = "First $\\boxed{1}$, then $\\boxed{\\frac{\\sqrt{2}}{2}}$ and $x^{2}$."
    assert last_boxed(solution) == "\\boxed{\\frac{\\sqrt{2}}{2}}"
    assert reference_answer(solution) == "\\frac{\\sqrt{2}}{2}"
    assert reference_answer("so $\\boxed{\\{1, 2\\}}$") == "\\{1, 2\\}"
    assert last_boxed("no box, $\\fbox{7}$") == "\\fbox{7}" and reference_answer("$\\fbox{7}$") is None
    assert reference_answer("$\\boxed 5$.") is None  # no braces after \boxed
    assert reference_answer("$\\boxed{\\frac{1}{2}$") is None  # the braces never close
    assert reference_answer("no answer") is None


@pytest.mark.parametrize("completion, expected", [
    ("so x = 3", None),  # no "The answer is: "
    ("The answer is 3", None),  # no colon
    ("The answer is: 5.\nThe answer is: \\frac{1}{2}", "\\frac{1}{2}"),  # the last one counts
    ("The answer is: 3.\nIt checks out.", "3"),  # cut at the first ".\n"
    ("The answer is: 3.14.", "3.14"),  # one trailing period removed
    ("The answer is:  (1, 2) \n", "(1, 2)"),  # stripped
    ("The answer is: ", ""),  # valid, but empty
])
def test_extract_math_answer_follows_the_authors_rules(completion, expected):
    assert extract_math_answer(completion) == expected


# -----------------------------------------------------------------------------
# normalization


@pytest.mark.parametrize("answer, expected", [
    ("1\n2", "12"),  # line breaks
    ("3\\!000", "3000"),  # inverse spaces
    ("\\\\frac{1}{2}", "\\frac{1}{2}"),  # double backslash
    ("\\tfrac{1}{2}", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\left(1,2\\right)", "(1,2)"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\$5", "5"),
    ("5\\text{ cm}", "5"),  # a unit on the right
    ("50\\%", "50"),
    ("x = .25", "0.25"),  # " ." gets a 0 (then "x =" goes: the left side has at most 2 characters)
    ("\\frac{.5}{2}", "\\frac{0.5}{2}"),  # "{." gets a 0
    (".25", "0.25"),  # a leading "."
    ("y=2x+1", "2x+1"),
    ("abc=5", "abc=5"),  # a left side of 3 characters stays
    ("a=b=c", "a=b=c"),  # two "=" stay
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\sqrt{2}", "\\sqrt{2}"),
    ("1 + 2", "1+2"),  # spaces
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\frac{a}b", "\\frac{a}b"),
    ("\\frac1", "\\frac1"),  # a single character after \frac: unchanged
    ("0.5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"),
    ("03/4", "03/4"),  # not canonical: kept
    ("1/2/3", "1/2/3"),  # two slashes: kept
    ("", ""),
])
def test_strip_string_applies_each_rule(answer, expected):
    assert strip_string(answer) == expected


def test_strip_string_removes_percent_signs_twice_as_theirs():
    # utils.strip_string removes "\%" twice (its rules replace("\\%", "") and replace("\%", "") are the same string), so
    # a "\%" that the first removal brings together goes too: 5\\\%% -> 5\\%% ("\\" becomes "\") -> 5\% -> 5
    assert strip_string("5\\\\\\%%") == "5"


@pytest.mark.parametrize("answer", [
    "5\\text{ m}\\text{ s}",  # two units: their assertion
    "2\\sqrt",  # \sqrt with nothing after it: their IndexError
    "1+\\frac",  # \frac with nothing after it: their IndexError
    "x/4",  # a side int() cannot read: their ValueError, which their except does not catch
    "\\pi/2",
])
def test_strip_string_raises_where_theirs_raises(answer):
    with pytest.raises(ValueError):
        strip_string(answer)


# -----------------------------------------------------------------------------
# equivalence


@pytest.mark.parametrize("prediction, reference, expected", [
    ("0.5", "\\frac{1}{2}", True),  # strip_string's 0.5 rule
    (".5", "\\dfrac{1}{2}", True),
    ("3/4", "\\frac34", True),  # a/b and \frac34 normalize alike
    ("5 \\text{ cm}", "5", True),
    ("1,000", "1000", True),  # numbers: commas ignored
    ("3.0001", "3", True),  # rel_tol 1e-4
    ("3.01", "3", False),
    ("18", "0.18", True),  # the percentage leniency: reference * 100 ...
    ("0.18", "18", True),  # ... and reference / 100
    ("7", "8", False),
    ("", "3", False),  # an empty prediction
    ("[1,2]", "1,2", True),  # outer brackets dropped when the reference does not start with "("
    ("(1,2)", "{1,2}", True),
    ("(1,2)", "[1,2]", False),
    ("\\frac{12}{3}", "\\frac{1}{23}", True),  # braces removed: their leniency
    ("(1,2.00001)", "(1,2)", True),  # element-wise
    ("(1,3)", "(1,2)", False),
    ("(1,2,3)", "(1,2)", False),
    ("x+1", "1+x", True),  # symbolic
    ("2*(x+1)", "2*x+2", True),
    ("sqrt(8)", "2*sqrt(2)", True),
    ("pi/2", "1.5708", True),  # numerically within rel_tol 1e-3
    ("x+1", "x+2", False),
    ("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi", False),  # LaTeX is not parsed, as in the authors' environment
    ("2^3", "8", False),  # "^" is not read (their parse_expr made it XOR)
])
def test_is_equiv_follows_strip_string_and_math_equal(prediction, reference, expected):
    assert is_equiv(prediction, reference) is expected


def test_symbolic_comparison_never_runs_the_answer_as_code(monkeypatch):
    called = []
    monkeypatch.setattr(sys, "breakpointhook", lambda *a, **k: called.append(True))
    assert not symbolic_equal("breakpoint()", "1") and not called  # no builtin is in scope
    assert not symbolic_equal("x.evalf(1000000)", "x")  # no attribute access
    start = time.perf_counter()
    assert not symbolic_equal("9**9**9**9", "1")  # no powers: this one would never finish
    assert not symbolic_equal("1+" * 60 + "1", "61")  # longer than MATH_MAX_PLAIN_EXPRESSION
    assert time.perf_counter() - start < 1


def test_the_authors_fallback_counts_an_answer_that_fails_normalization_as_correct():
    # strip_string raises on "x/4", and theirs then compares the prediction with itself
    assert not is_equiv("x/4", "7") and is_equiv("x/4", "7", authors_fallback=True)
    assert not is_equiv("7", "y/2") and is_equiv("7", "y/2", authors_fallback=True)  # a reference too
    assert is_equiv("x/4", "x/4") and is_equiv("x/4", "x/4", authors_fallback=True)  # equal strings
    # when normalization succeeds the two agree
    assert is_equiv("5", "5", authors_fallback=True) and not is_equiv("5", "6", authors_fallback=True)


def test_score_math_counts_invalid_answers_and_the_verdicts_the_fallback_flips():
    completions = ["It is half.\nThe answer is: 0.5", "The answer is: 5.\n", "The answer is: x/3", "I do not know."]
    result = score_math(completions, ["\\frac{1}{2}", "5", "3", "3"])
    assert {k: v for k, v in result.items() if not isinstance(v, list)} == {
        "accuracy": 0.5, "correct": 2, "invalid": 1, "total": 4, "accuracy_authors_fallback": 0.75,
        "changed_by_authors_fallback": 1}
    assert result["extracted"] == ["0.5", "5", "x/3", None]
    assert result["is_correct"] == [True, True, False, False]
    assert result["is_correct_authors_fallback"] == [True, True, True, False]
    with pytest.raises(ValueError, match="as many"):
        score_math(completions, ["1"])


def test_score_math_grades_answers_nested_hundreds_of_brackets_deep():
    deep_1, deep_2 = "(" * 400 + "1" + ")" * 400, "(" * 400 + "2" + ")" * 400
    result = score_math(["The answer is: " + deep_1, "The answer is: " + deep_1, "The answer is: " + deep_1],
                        [deep_2, "5", deep_1])
    assert result["is_correct"] == [False, False, True] and result["correct"] == 1


# -----------------------------------------------------------------------------
# hostile answers: the grader answers quickly and never raises


OLD_PLAIN_EXPRESSION_RE = re.compile(r"(?:\d*\.?\d+|[A-Za-z]+|[-+*/()])+")  # what is_plain_expression replaced


@pytest.mark.parametrize("text, expected", [
    ("5", True), ("3.25", True), (".25", True), ("1.2.3", True),  # "1.2" then ".3"
    ("x+1", True), ("2*(x+1)", True), ("sqrt(8)/pi", True), ("2x", True), (")(", True), ("**", True),
    ("\u0663.\u0661", True),  # \d is any Unicode digit, in both
    ("", False), ("5.", False), ("1..2", False), ("a.b", False), ("1 + 2", False), ("2^3", False), ("1,2", False),
    ("\\frac{1}{2}", False), ("x_1", False), ("\uff21", False),  # a fullwidth A is no [A-Za-z]
])
def test_is_plain_expression_agrees_with_the_pattern_it_replaced(text, expected):
    assert is_plain_expression(text) is expected
    assert (OLD_PLAIN_EXPRESSION_RE.fullmatch(text) is not None) is expected


def test_is_plain_expression_agrees_with_the_pattern_it_replaced_on_every_short_string():
    # every string of up to 5 characters over these 8: the old pattern is quick on strings this short
    for n in range(6):
        for chars in itertools.product("1a.+(,\u0663 ", repeat=n):
            text = "".join(chars)
            assert is_plain_expression(text) is (OLD_PLAIN_EXPRESSION_RE.fullmatch(text) is not None), text


HOSTILE_ANSWERS = {  # 26 letters and a comma took 13 s before, and each 2 more letters 4 times as long
    "26 letters,": "a" * 26 + ",", "28 letters,": "a" * 28 + ",", "200 letters,": "a" * 200 + ",",
    "400 letters,": "a" * 400 + ",", "20 digits!": "1" * 20 + "!",
    "a sentence": "There are infinitely many solutions, so the answer cannot be determined.",
    "0.1666...": "0.16666666666666666666666666...", "0.111...": "0." + "1" * 300 + "...", "300 x": "x" * 300,
    "400 ()": "(" * 400 + "1" + ")" * 400, "400 []": "[" * 400 + "1" + "]" * 400, "400 {}": "{" * 400 + "1" + "}" * 400,
    # plain expressions short enough for sympy that keep it busy: 54 s, and more than 30 s, before its time limit
    "8 trinomials": "*".join(f"({x}+{y}+{z})" for x, y, z in zip(*[iter("abcdefghijklmnopqrstuvwx")] * 3)),
    "1e999999999": "1e999999999",
}


# The SIGALRM limit of a symbolic comparison is SYMPY_SECONDS of wall time, then the next bytecode boundary, which a
# long C-level call inside sympy delays: a bound that holds, not a figure. Unbounded, "8 trinomials" takes 54 s, so
# HANG_GUARD_SECONDS tells a working limit from a missing one without timing the grader on a loaded machine; that the
# limit, and not sympy finishing, stopped a comparison is asserted directly (limit_fired).
HANG_GUARD_SECONDS = 10


@pytest.fixture
def limit_fired(monkeypatch) -> list[bool]:
    """One True for each symbolic comparison that the time limit stopped."""
    fired, real = [], math_grader.time_limit

    @contextmanager
    def watched(seconds):
        try:
            with real(seconds):
                yield
        except math_grader.SympyTimeout:
            fired.append(True)
            raise

    monkeypatch.setattr(math_grader, "time_limit", watched)
    return fired


@pytest.mark.parametrize("reference", ["5", "\\frac{1}{6}"], ids=["5", "frac"])
@pytest.mark.parametrize("answer", list(HOSTILE_ANSWERS.values()), ids=list(HOSTILE_ANSWERS))
def test_hostile_answers_compare_unequal_within_the_time_limit(answer, reference, limit_fired):
    symbolic_equal("1", "1")  # sympy's first import is not the answer's time
    for compare in (is_equiv, math_equal):
        start = time.perf_counter()
        assert compare(answer, reference) is False
        assert time.perf_counter() - start < HANG_GUARD_SECONDS, (compare.__name__, answer[:40])
    # the slow plain expression against a plain reference is stopped by the limit, once per comparison; the other
    # pairs never reach sympy
    assert len(limit_fired) == (2 if (answer, reference) == (HOSTILE_ANSWERS["8 trinomials"], "5") else 0)


@pytest.mark.parametrize("pair", ["()", "[]", "{}", "([])"])
def test_answers_nested_hundreds_of_brackets_deep_compare_without_raising(pair):
    opening, closing = pair[:len(pair) // 2], pair[len(pair) // 2:]

    def nested(inner):  # 400 brackets deep
        return opening * (400 // len(opening)) + inner + closing * (400 // len(closing))

    for compare in (is_equiv, math_equal):
        assert compare(nested("1"), nested("2")) is False  # RecursionError before
        assert compare(nested("1"), nested("1")) is True  # equal once brackets are ignored
        assert compare(nested("1"), "5") is False


def test_math_equal_compares_nested_parts_down_to_its_nesting_bound():
    def nested(inner, levels):
        return "[" * levels + inner + "]" * levels

    assert math_equal(nested("2.00001", MATH_MAX_NESTING), nested("2", MATH_MAX_NESTING))  # level by level to 2
    assert not math_equal(nested("2.00001", MATH_MAX_NESTING + 1), nested("2", MATH_MAX_NESTING + 1))  # too deep


def test_the_time_limit_of_a_symbolic_comparison_leaves_the_alarm_as_it_was():
    import signal

    def mine(signum, frame):
        raise AssertionError("the caller's alarm handler ran")

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        assert symbolic_equal(HOSTILE_ANSWERS["8 trinomials"], "5") is False  # stopped by the time limit
        assert symbolic_equal("2*sqrt(3)/3", "2/sqrt(3)") is True  # an ordinary comparison still decides
        assert signal.getsignal(signal.SIGALRM) is mine and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, previous)

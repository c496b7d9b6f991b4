"""Data for LoRA-SB on math word problems: the authors' GSM8K / MetaMathQA / MATH protocol (prompts, training targets,
answer extraction and scoring, dataset loading, tokenization with response-only labels, resumable batching) and a
pure-Python `tokenizer.json` tokenizer with exact `tokenizers` parity.

The protocol follows the official code (github.com/CERT-Lab/lora-sb): training data and labels as in
`train_arithmetic.py` / `utils/data_utils.py`, evaluation prompt, stop strings and answer extraction as in
`instruction_tuning_eval/gsm8k_eval.py`, the lenient comparison from its `grader.py::math_equal`, and MATH's answers,
normalization and equivalence as in `MATH_eval.py` and `utils.py`.
Every quirk of theirs that changes a number is kept and named where it happens, except the one that makes wrong MATH
answers count as correct (is_equiv), which is fixed and measured.

Reading order: part 1, the protocol: prompts and training targets -> GSM8K scoring -> MATH scoring -> datasets ->
tokenized examples with response-only labels -> batching; part 2, the tokenizer: unicode classes -> normalizers ->
pre-tokenizers -> BPE -> decoders -> post-processor -> the Tokenizer class.
Needs torch, numpy, tqdm and the standard library, and sympy (installed with torch) for MATH's symbolic comparison
only, imported where it is used; imports nothing of the project.
"""

import functools
import heapq
import itertools
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


# ---------------------------------------------------------------------------------------------------------------------
# Part 1. The protocol of the official code (github.com/CERT-Lab/lora-sb): prompts and training targets, scoring,
# datasets, tokenized examples with response-only labels, and batching.
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and training targets (train_arithmetic.py, utils/data_utils.py; MetaMath's Alpaca-style prompt).
# ---------------------------------------------------------------------------------------------------------------------

TRAIN_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
EVAL_PROMPT = TRAIN_PROMPT + " Let's think step by step."  # gsm8k_eval.py: one space, no newline


def eval_prompt(question: str) -> str:
    """The evaluation prompt for one GSM8K question."""
    return EVAL_PROMPT.format(instruction=question)


def gsm8k_response(answer: str) -> str:
    """A GSM8K reference solution in MetaMathQA's form, as a training target.

    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\\n...\\n#### 18" becomes
    "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\\n...\\nThe answer is: 18": the calculator annotations <<...>> are
    removed and the "#### N" line is replaced by "The answer is: N", the form the evaluation extracts. N is written
    without thousands separators (93 GSM8K answers have one), because the extraction regex reads a single separator.
    """
    rationale, sep, final = answer.rpartition("#### ")
    if not sep:
        raise ValueError(f"GSM8K answer without a final '#### N' line: {answer[-80:]!r}")
    rationale = re.sub(r"<<.*?>>", "", rationale).rstrip()
    return f"{rationale}\nThe answer is: {final.strip().replace(',', '')}"


# ---------------------------------------------------------------------------------------------------------------------
# GSM8K scoring (instruction_tuning_eval/gsm8k_eval.py and grader.py).
# ---------------------------------------------------------------------------------------------------------------------

STOP_STRINGS = ["Instruction:", "Instruction", "Response:", "Response"]  # gsm8k_eval.py's vLLM stop list
ANSWER_PREFIX = "The answer is: "
NUMBER_RE = re.compile(r"[\-+]?\d*[\.,/]?\d+")  # at most one separator: "1,234,567" reads as 1234


def cut_at_stop(text: str) -> tuple[str, bool]:
    """(text before the first stop string, whether one occurred), for generated text only (never the prompt): vLLM's
    `stop`, which removes the stop string and everything after it."""
    positions = [i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0]
    return (text[:min(positions)], True) if positions else (text, False)


def extract_answer(completion: str) -> int | None:
    """The predicted number, as the authors' `extract_answer_number` reads it; None when invalid.

    Take the text after the last "The answer is: " (colon and space required), strip it, and read the first match of
    [\\-+]?\\d*[\\.,/]?\\d+. A fraction a/b gives round(a / b) (b == "0" gives round(a)); otherwise commas are removed
    and the value is rounded. round is Python's banker's rounding (2.5 -> 2) and the result is an int.
    Two deviations where theirs raises instead: a zero denominator other than "0" ("00") and an infinite value are
    invalid (theirs rejects only +inf and crashes on -inf).
    """
    parts = completion.split(ANSWER_PREFIX)
    if len(parts) < 2:
        return None
    match = NUMBER_RE.search(parts[-1].strip())
    if match is None:
        return None
    text = match.group()
    if "/" in text:
        numerator, denominator = text.split("/")
        # their is_number(numerator) check: the regex leaves a sign alone (or nothing) when there is no digit
        if not any(c.isdigit() for c in numerator):
            return None
        if denominator == "0":
            value = float(numerator)
        elif int(denominator) == 0:
            return None
        else:
            try:  # round(Fraction(text)) in theirs: int / int is correctly rounded, like the fraction's float value
                value = int(numerator) / int(denominator)
            except OverflowError:
                return None
    else:
        value = float(text.replace(",", ""))
    return None if math.isinf(value) else round(value)


def gold_answer(answer_text: str) -> int:
    """The reference answer of a GSM8K solution: int(answer.split("#### ")[1].replace(",", "")), as gsm8k_eval.py."""
    parts = answer_text.split("#### ")
    if len(parts) < 2:
        raise ValueError(f"GSM8K answer without '#### N': {answer_text[-80:]!r}")
    return int(parts[1].replace(",", ""))


def is_correct(pred: float | None, gold: float) -> bool:
    """float(pred) == float(gold), or the authors' math_equal(pred, gold) with include_percentage: pred within
    rel_tol 1e-4 of gold / 100, gold or gold * 100. This leniency is theirs, not MetaMath's: "1800" is accepted for
    gold 18, and for gold 100000 so is 100009."""
    if pred is None:
        return False
    return float(pred) == float(gold) or any(math.isclose(float(pred), g, rel_tol=1e-4)
                                             for g in (gold / 100, float(gold), gold * 100))


def score(completions: list[str], golds: list[float]) -> dict:
    """GSM8K accuracy of generated completions (already cut at the stop strings) against gold numbers, with the result
    of each completion, so that a caller scores every answer once.

    Returns accuracy (correct / total), correct, invalid (completions with no extractable answer; they count as wrong)
    and total, and per completion, in order: extracted (its extract_answer value, None when invalid) and is_correct
    (its is_correct against its gold, a bool)."""
    if len(completions) != len(golds) or not golds:
        raise ValueError(f"need as many completions as gold answers, at least one; got {len(completions)} "
                         f"and {len(golds)}")
    preds = [extract_answer(c) for c in completions]
    hits = [is_correct(p, g) for p, g in zip(preds, golds)]
    correct = sum(hits)
    return {"accuracy": correct / len(golds), "correct": correct, "invalid": sum(p is None for p in preds),
            "total": len(golds), "extracted": preds, "is_correct": hits}


# ---------------------------------------------------------------------------------------------------------------------
# MATH scoring (instruction_tuning_eval/MATH_eval.py, utils.py and grader.py, which follow MetaMath's eval_math.py and
# util.py, after Hendrycks' math_equivalence). The prompt, the stop strings and "The answer is: " are GSM8K's; the
# budget is 512 new tokens. The reference answer is the last \boxed{...} of the reference solution.
# ---------------------------------------------------------------------------------------------------------------------

MATH_MAX_PLAIN_EXPRESSION = 100  # characters; longer answers are not handed to sympy (see symbolic_equal)
PLAIN_EXPRESSION_RE = re.compile(r"(?:\d*\.?\d+|[A-Za-z]+|[-+*/()])+")


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
    ("^{\circ}", "^\circ"), "\$", a "\text{ unit}" on the right and "\%"; " ." and "{." get a 0 and so does a leading
    "."; a short left side "k = " is dropped (at most 2 characters before the only "="); sqrt arguments are braced;
    spaces are dropped; fraction arguments are braced; "0.5" becomes "\frac{1}{2}"; an integer ratio a/b becomes
    "\frac{a}{b}". Raises ValueError where theirs raises (remove_right_units, fix_sqrt, fix_fracs, fix_a_slash_b)."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "")
    text = remove_right_units(text)
    text = text.replace("\\%", "")
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
    sympy is installed with torch; it is imported here, the one place it is used."""
    if not all(len(s) <= MATH_MAX_PLAIN_EXPRESSION and "**" not in s and PLAIN_EXPRESSION_RE.fullmatch(s)
               for s in (a, b)):
        return False
    import sympy
    from sympy.parsing.sympy_parser import parse_expr

    def parse(s):
        scope = {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational, "Symbol": sympy.Symbol,
                 "Function": sympy.Function, "sqrt": sympy.sqrt, "pi": sympy.pi, "__builtins__": {}}
        return parse_expr(s, global_dict=scope)

    try:  # every step may raise on odd input, which means "not equal", as theirs catches everything
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


def wrapped(text: str, pair: str) -> bool:
    """Whether text starts with pair[0] and ends with pair[1], e.g. pair "()"."""
    return text.startswith(pair[0]) and text.endswith(pair[1])


def math_equal(prediction: str, reference: str) -> bool:
    """grader.py's math_equal (include_percentage, is_close, no timeout), on two strings:

    1. Both numbers (is_number): equal when the prediction is within rel_tol 1e-4 of reference / 100, reference or
       reference * 100 (the GSM8K leniency), else not equal.
    2. An empty prediction is not equal.
    3. Equal when the two agree once brackets are ignored: if the prediction is wrapped in [] (and the reference does
       not start with "(") or in () (and the reference does not start with "["), both lose their outer [ ] ( )
       characters; then every {, }, ( and ) is removed from both. So "(1,2)" equals "1,2" and "{1,2}", but not
       "[1,2]"; and "\\frac{12}{3}" equals "\\frac{1}{23}" (a leniency of theirs, kept).
    4. Both wrapped in [] or both in (): equal when they have as many comma-separated parts, each equal by math_equal.
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
        if len(pred_parts) == len(ref_parts) and all(math_equal(p, r) for p, r in zip(pred_parts, ref_parts)):
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


# ---------------------------------------------------------------------------------------------------------------------
# Datasets: GSM8K (the official jsonl files), MetaMathQA (the hub's JSON list, or JSON lines) and MetaMath's MATH test
# file, checked per record.
# ---------------------------------------------------------------------------------------------------------------------

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
GSM8K_SHA256 = {
    "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",  # 7473 problems
    "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",  # 1319 problems
}
METAMATHQA_FILE = "datasets/meta-math/MetaMathQA/resolve/main/MetaMathQA-395K.json"  # on the Hugging Face hub
# MetaMath's MATH test file (5000 problems), which the authors' MATH_eval.py reads. No checksum is pinned: MetaMath
# publishes none, and the file could not be fetched where this code was written to compute one.
MATH_URL = "https://raw.githubusercontent.com/meta-math/MetaMath/main/data/test/MATH_test.jsonl"


def _check_row(row: object, keys: tuple[str, ...], where: str) -> dict:
    """The `keys` of one record (each a string), or a ValueError naming file:line / file[index]."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(keys)}, got {type(row).__name__}")
    for key in keys:
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: missing string field {key!r} (keys are {sorted(row)})")
    return {key: row[key] for key in keys}


def jsonl_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each line of a JSON-lines file but blank ones; where is "file:line", for error messages."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield f"{path}:{lineno}", record


def read_jsonl(path: str | Path, keys: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped), each reduced to `keys`; at most `limit` of them."""
    return [_check_row(record, keys, where) for where, record in itertools.islice(jsonl_records(path), limit)]


def load_gsm8k(split: str, data_dir: str | Path) -> list[dict]:
    """GSM8K `split` ("train": 7473, "test": 1319) from `data_dir/{split}.jsonl`, as dicts with keys question, answer.
    (train_gsm8k.py downloads the official files into a cache folder when no --data_dir is given.)"""
    if split not in GSM8K_SHA256:
        raise ValueError(f"GSM8K split must be one of {sorted(GSM8K_SHA256)}, got {split!r}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data_dir must hold GSM8K's train.jsonl and test.jsonl "
                                f"(from {GSM8K_URL})")
    return read_jsonl(path, ("question", "answer"))


def load_metamathqa(num_examples: int, path: str | Path) -> list[dict]:
    """The first `num_examples` rows of MetaMathQA in dataset order (the paper: 50000), dicts with keys query, response,
    from `path`: the hub's JSON list (MetaMathQA-395K.json) or JSON lines."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MetaMathQA file {path} not found")
    with open(path, encoding="utf-8") as f:
        is_json_list = f.read(4096).lstrip().startswith("[")
    if is_json_list:
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = [_check_row(r, ("query", "response"), f"{path}[{i}]") for i, r in enumerate(records[:num_examples])]
    else:
        rows = read_jsonl(path, ("query", "response"), limit=num_examples)
    if len(rows) < num_examples:
        raise ValueError(f"{path} holds {len(rows)} examples, fewer than the {num_examples} requested")
    return rows


def load_math(path: str | Path) -> list[dict]:
    """MetaMath's MATH test file (MATH_test.jsonl, 5000 problems): JSON lines with string fields instruction (the
    problem) and output (the reference solution), and, when the file has them, type (the subject) and level. Returns
    dicts with keys question (the instruction), answer (the inside of the last \\boxed{...} of output, see
    reference_answer), and subject and level when present. A solution without a \\boxed{...} answer is an error naming
    its file and line (theirs silently scored that problem as wrong)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MATH test file {path} not found (MetaMath's MATH_test.jsonl, from {MATH_URL})")
    problems = []
    for where, record in jsonl_records(path):
        row = _check_row(record, ("instruction", "output"), where)
        answer = reference_answer(row["output"])
        if answer is None:
            raise ValueError(f"{where}: the reference solution has no \\boxed{{...}} answer (its end: "
                             f"{row['output'][-80:]!r}); fix the line or remove it")
        problem = {"question": row["instruction"], "answer": answer}
        problem.update({name: str(record[key]) for key, name in (("type", "subject"), ("level", "level"))
                        if key in record})
        problems.append(problem)
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing examples with response-only labels (utils/data_utils.py, the Alpaca / MetaMath `preprocess` rule).
# ---------------------------------------------------------------------------------------------------------------------

def tokenize_example(tokenizer: "Tokenizer", prompt: str, response: str, max_length: int) -> dict:
    """input_ids = encode(prompt + response) + [eos], cut to max_length from the right; labels = input_ids with -100
    on the first len(encode(prompt)) positions.

    This is the authors' rule (utils/data_utils.py, from Alpaca / MetaMath `preprocess`): the full text is tokenized
    together and the prompt length is the token count of the prompt tokenized alone, which reproduces their labels
    exactly. When a tokenizer merges the last prompt character with the first response character, encode(prompt) is
    not a prefix of the full ids and the boundary token is mislabeled; `prompt_is_prefix` records that.
    The authors append EOS as text, which their fast tokenizer maps to the EOS id; appending the id gives the same ids
    without relying on special tokens being parsed out of text.
    Truncation drops EOS (and the answer) from long examples, as theirs does; `truncated` records it.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token; training targets end with EOS")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    full_ids = tokenizer.encode(prompt + response, add_special_tokens=True) + [tokenizer.eos_id]
    input_ids = full_ids[:max_length]
    num_masked = min(len(prompt_ids), len(input_ids))
    return {
        "input_ids": input_ids,
        "labels": [-100] * num_masked + input_ids[num_masked:],
        "truncated": len(full_ids) > max_length,
        "prompt_is_prefix": full_ids[:len(prompt_ids)] == prompt_ids,
    }


def tokenize_dataset(tokenizer: "Tokenizer", pairs: list[tuple[str, str]], max_length: int) -> tuple[list[dict], int]:
    """Tokenize a list of (prompt, response) pairs; returns (examples with input_ids and labels, number truncated).

    Warns with the count of prompts whose ids are not a prefix of their full ids (see tokenize_example): their label
    boundary is off by a token, as in the authors' runs. SmolLM2's tokenizer keeps the ':' of "### Response:" apart
    from a following letter, digit, '$', space or newline, but merges it with '(', '-' or '\\' into one token.
    """
    examples, num_truncated, num_mismatched = [], 0, 0
    for prompt, response in tqdm(pairs, desc="tokenizing", disable=len(pairs) < 10000):
        example = tokenize_example(tokenizer, prompt, response, max_length)
        num_truncated += example["truncated"]
        num_mismatched += not example["prompt_is_prefix"]
        examples.append({"input_ids": example["input_ids"], "labels": example["labels"]})
    if num_mismatched:
        warnings.warn(f"{num_mismatched} of {len(pairs)} prompts tokenize differently alone than inside prompt + "
                      f"response: their first response token is masked or their last prompt token is trained "
                      f"(the authors' rule, kept)")
    return examples, num_truncated


# ---------------------------------------------------------------------------------------------------------------------
# Batching: padded batches in an order that is a function of (seed, epoch) alone, so a run resumes mid-epoch exactly.
# ---------------------------------------------------------------------------------------------------------------------

BUCKET_BATCHES = 50  # length bucketing sorts the examples within windows of this many batches


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example: input_ids (B, T) long, attention_mask (B, T) bool (True on real tokens, set
    by length, not by id, since pad may equal EOS), labels (B, T) long with -100 on padding."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Batches:
    """Padded batches in an order that is a function of (seed, epoch) alone, so (epoch, position) is the whole state
    and a run resumes mid-epoch exactly (torch's DataLoader has no state_dict: pytorch/pytorch#36650).

    Epoch e draws a permutation of the examples from a torch.Generator seeded with (seed, e) (dataset order when
    shuffle is False) and cuts it into batches of batch_size; the last batch may be smaller. With bucket_by_length,
    each window of BUCKET_BATCHES batches is sorted by length before cutting (less padding) and the batch order is
    then shuffled. With world_size > 1, rank r takes batches r, r + world_size, ... and the num_batches % world_size
    batches left over are dropped, so all ranks run the same number of steps (an uneven count hangs DDP).

    next_batch() returns the batch at (epoch, position) and advances, rolling over into the next epoch; it is what a
    trainer that counts steps calls. Iterating yields the rest of the current epoch through next_batch().
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, shuffle: bool = True,
                 bucket_by_length: bool = False, rank: int = 0, world_size: int = 1, pad_id: int = 0) -> None:
        if batch_size < 1 or seed < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, seed >= 0 and 0 <= rank < world_size; got "
                             f"batch_size={batch_size}, seed={seed}, rank={rank}, world_size={world_size}")
        if math.ceil(len(examples) / batch_size) < world_size:
            raise ValueError(f"{len(examples)} examples make fewer than one batch of {batch_size} per rank "
                             f"for {world_size} ranks")
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.bucket_by_length, self.rank, self.world_size, self.pad_id = bucket_by_length, rank, world_size, pad_id
        self.epoch, self.position = 0, 0
        self._batches, self._batches_epoch = None, None

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return math.ceil(len(self.examples) / self.batch_size) // self.world_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The example indices of this rank's batches in epoch `epoch`."""
        # SeedSequence hashes (seed, epoch) into one 64-bit seed, so nearby pairs get unrelated orders
        epoch_seed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(epoch_seed))
        n, bs = len(self.examples), self.batch_size
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.bucket_by_length:
            window = BUCKET_BATCHES * bs
            order = [i for start in range(0, n, window)
                     for i in sorted(order[start:start + window], key=lambda i: -len(self.examples[i]["input_ids"]))]
        batches = [order[start:start + bs] for start in range(0, n, bs)]
        if self.bucket_by_length and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches[self.rank:len(self) * self.world_size:self.world_size]

    def next_batch(self) -> dict:
        """The batch at (epoch, position); then advance, to the next epoch after the last batch."""
        if self._batches_epoch != self.epoch:
            self._batches, self._batches_epoch = self.epoch_batches(self.epoch), self.epoch
        batch = collate([self.examples[i] for i in self._batches[self.position]], self.pad_id)
        self.position += 1
        if self.position == len(self):
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch (all of them when it has not started)."""
        for _ in range(len(self) - self.position):
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved (epoch, position); the examples, batch size and world size must be those of the save."""
        missing = {"seed", "epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"data state is missing {sorted(missing)}")
        if state["seed"] != self.seed:
            raise ValueError(f"the data order was saved with seed {state['seed']}, this run has seed {self.seed}; "
                             f"resume with the same --seed")
        if state["epoch"] < 0 or not 0 <= state["position"] < len(self):
            raise ValueError(f"data position (epoch {state['epoch']}, batch {state['position']}) is outside this run's "
                             f"{len(self)} batches per epoch: the data, batch size or world size changed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------------------------------
# Part 2. The tokenizer: a Hugging Face tokenizer.json in pure Python (no `tokenizers`, no `regex`). Covers the BPE
# tokenizers of the supported families: byte-level BPE (SmolLM2, Qwen2/2.5, Llama-3) and SentencePiece-style BPE with
# byte fallback (Llama-2, Mistral-7B-v0.1). The pipeline is the one `tokenizers` runs (tokenizers/src/tokenizer/mod.rs,
# `encode_single_sequence`): added tokens split out -> normalizer -> pre-tokenizer -> BPE model -> post-processor;
# decoding maps ids to tokens and runs the decoder chain. A component this file does not implement raises a ValueError
# naming it and the file, so a tokenizer loads with exact parity or not at all.
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# Unicode classes. Python's `re` has no \p{...}, and its \s also matches U+001C-U+001F, while Oniguruma (the regex
# engine of `tokenizers`) follows the Unicode White_Space property. We rewrite \p{..}, \P{..}, \s and \S into explicit
# code point ranges scanned from `unicodedata`; both engines then backtrack the same way, so matches agree.
# ---------------------------------------------------------------------------------------------------------------------

Range = tuple[int, int]  # an inclusive range of code points, (lo, hi)

WHITE_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))

# The pattern of the ByteLevel pre-tokenizer with use_regex=true. It is hard-coded in tokenizers
# (pre_tokenizers/byte_level.rs, from GPT-2's encoder.py), not stored in tokenizer.json.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@functools.cache
def category_ranges() -> dict[str, list[Range]]:
    """Map each general category ("Lu", "Nd", ...) to its code point ranges [(lo, hi), ...], scanning all of Unicode
    once (about 0.3 s)."""
    table, start, current = {}, 0, unicodedata.category("\0")
    for cp in range(1, 0x110000):
        category = unicodedata.category(chr(cp))
        if category != current:
            table.setdefault(current, []).append((start, cp - 1))
            start, current = cp, category
    table.setdefault(current, []).append((start, 0x10FFFF))
    return table


def property_ranges(name: str) -> list[Range]:
    """Sorted, merged ranges of \\p{name}: a major class ("L", "N", ...) or a general category ("Lu", "Nd", ...)."""
    table = category_ranges()
    categories = [c for c in table if c == name or (len(name) == 1 and c[0] == name)]
    if not categories:
        raise ValueError(f"unsupported Unicode property \\p{{{name}}} (supported: general categories such as L, N, Lu)")
    merged = []
    for lo, hi in sorted(r for c in categories for r in table[c]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def complement(ranges: Iterable[Range]) -> list[Range]:
    """The code points of [0, 0x10FFFF] that are not in the sorted, disjoint `ranges`."""
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= 0x10FFFF:
        out.append((nxt, 0x10FFFF))
    return out


def class_body(ranges: Iterable[Range]) -> str:
    """Ranges as the inside of a Python `[...]` character class, e.g. '\\U00000041-\\U0000005a'."""
    return "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


_REGEX_TOKEN = re.compile(r"\\[pP]\{[^}]*\}|\\.|\[\^?\]?|\]|[^\\\[\]]+", re.S)


@functools.cache
def compile_regex(pattern: str) -> re.Pattern[str]:
    """Compile an Oniguruma pattern from tokenizer.json with Python `re`, rewriting \\p{X}, \\P{X}, \\s, \\S (also
    inside [...] and [^...]) into explicit ranges and the anchors into their Ruby-syntax meaning. Scoped flags such as
    (?i:...) mean the same in both engines."""
    out, in_class = [], False
    for token in _REGEX_TOKEN.findall(pattern):
        ranges = None
        if token in ("\\p", "\\P"):
            raise ValueError(f"unsupported {token} without {{...}} in regex {pattern!r}")
        if token[:2] in ("\\p", "\\P"):
            ranges = property_ranges(token[3:-1])
            ranges = complement(ranges) if token[1] == "P" else ranges
        elif token in ("\\s", "\\S"):
            ranges = list(WHITE_SPACE) if token == "\\s" else complement(WHITE_SPACE)
        elif token in ("\\z", "\\Z"):  # Ruby's end of text, and end of text before an optional final newline
            token = "\\Z" if token == "\\z" else "(?=\\n?\\Z)"
        elif token in ("\\w", "\\W", "\\b", "\\B"):
            # Oniguruma's word characters (Alphabetic, marks, Nd, Pc) differ from Python's str.isalnum().
            raise ValueError(f"unsupported {token} in regex {pattern!r}: its Unicode meaning differs between engines")
        elif token[0] == "[":
            if in_class:
                raise ValueError(f"unsupported nested character class in regex {pattern!r}")
            in_class = True
        elif token == "]":
            in_class = False
        if ranges is None:
            out.append(token)
        else:
            out.append(class_body(ranges) if in_class else f"[{class_body(ranges)}]")
    try:
        return re.compile("".join(out), re.MULTILINE)  # Oniguruma's default (Ruby) syntax: ^ and $ are line anchors
    except re.error as e:
        raise ValueError(f"cannot translate regex {pattern!r} to Python re: {e}") from None


def pattern_regex(pattern: dict, where: str) -> re.Pattern[str]:
    """The compiled regex of a tokenizer.json pattern, {"String": literal} or {"Regex": oniguruma pattern}."""
    if pattern.get("String"):
        return re.compile(re.escape(pattern["String"]))
    if "Regex" in pattern:
        try:
            return compile_regex(pattern["Regex"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: pattern {pattern!r} has neither a non-empty 'String' nor a 'Regex'")


def unsupported(where: str, what: str, kind: str | None, supported: list[str]) -> ValueError:
    """The error for a component type this file does not implement, naming it and the file."""
    return ValueError(f"{where}: unsupported {what} type {kind!r} (this loader implements: {', '.join(supported)})")


# ---------------------------------------------------------------------------------------------------------------------
# Normalizers: str -> str (tokenizers/src/normalizers/). None means "no normalizer".
# ---------------------------------------------------------------------------------------------------------------------

Normalizer = Callable[[str], str]


def build_normalizer(cfg: dict | None, where: str) -> Normalizer | None:
    """NFC (unicode.rs), Prepend (prepend.rs: prefix non-empty text), Replace (replace.rs: every match of a literal or
    regex), Sequence (utils.rs)."""
    if cfg is None:
        return None
    kind = cfg.get("type")
    if kind == "NFC":
        return functools.partial(unicodedata.normalize, "NFC")
    if kind == "Prepend":
        prefix = cfg["prepend"]
        return lambda s: prefix + s if s else s
    if kind == "Replace":
        regex, content = pattern_regex(cfg["pattern"], where), cfg["content"]
        return lambda s: regex.sub(lambda m: content, s)
    if kind == "Sequence":
        steps = [build_normalizer(c, where) for c in cfg["normalizers"]]
        return lambda s: functools.reduce(lambda acc, step: step(acc), steps, s)
    raise unsupported(where, "normalizer", kind, ["NFC", "Prepend", "Replace", "Sequence"])


# ---------------------------------------------------------------------------------------------------------------------
# Pre-tokenizers: (text, at_start) -> [(piece, at_start), ...] (tokenizers/src/pre_tokenizers/). `at_start` says the
# piece begins at offset 0 of the original text (Metaspace's prepend_scheme "first" needs it). Empty pieces are dropped,
# as PreTokenizedString::split does.
# ---------------------------------------------------------------------------------------------------------------------

Pieces = list[tuple[str, bool]]  # [(piece, at_start), ...]
PreTokenizer = Callable[[str, bool], Pieces]

SPLIT_BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


def find_matches(regex: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    """(start, end) of the matches in `text` as the onig crate's `find_iter` yields them. Unlike Python's finditer,
    it never yields a match that starts where the previous one ended when either of the two is empty; it resumes the
    search one character later instead. This only matters for patterns that can match the empty string."""
    matches, pos = [], 0
    while pos <= len(text):
        for m in regex.finditer(text, pos):
            if matches and m.start() == matches[-1][1] and (m.start() == m.end() or matches[-1][0] == matches[-1][1]):
                pos = m.start() + 1
                break
            matches.append(m.span())
        else:
            break
    return matches


def split_spans(text: str, regex: re.Pattern[str], behavior: str, invert: bool = False) -> list[tuple[int, int]]:
    """NormalizedString::split (tokenizers/src/tokenizer/normalizer.rs): cut `text` into matches and the gaps between
    them, then keep, drop or merge the matches according to `behavior`. Returns non-empty (start, end) spans."""
    spans, prev = [], 0  # (start, end, is_match)
    for start, end in find_matches(regex, text):
        if start > prev:
            spans.append((prev, start, invert))
        spans.append((start, end, not invert))
        prev = end
    if prev < len(text):
        spans.append((prev, len(text), invert))
    out, previous_match = [], False
    if behavior == "Removed":
        out = [(s, e) for s, e, is_match in spans if not is_match]
    elif behavior == "Isolated":
        out = [(s, e) for s, e, _ in spans]
    elif behavior == "Contiguous":
        for s, e, is_match in spans:
            if out and is_match == previous_match:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
            previous_match = is_match
    elif behavior == "MergedWithPrevious":
        for s, e, is_match in spans:
            if out and is_match and not previous_match:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
            previous_match = is_match
    elif behavior == "MergedWithNext":
        for s, e, is_match in reversed(spans):
            if out and is_match and not previous_match:
                out[-1] = (s, out[-1][1])
            else:
                out.append((s, e))
            previous_match = is_match
        out.reverse()
    else:
        raise ValueError(f"unknown split behavior {behavior!r} (expected one of {', '.join(SPLIT_BEHAVIORS)})")
    return [(s, e) for s, e in out if e > s]


def split_pieces(text: str, at_start: bool, regex: re.Pattern[str], behavior: str, invert: bool = False) -> Pieces:
    """Split: pieces of `text` from split_spans; only the first can still be at the start of the original text."""
    return [(text[s:e], at_start and s == 0) for s, e in split_spans(text, regex, behavior, invert)]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF map to themselves, the
    other 68 bytes to chr(256), chr(257), ... in byte order (pre_tokenizers/byte_level.rs)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        table[b] = chr(b) if b in keep else chr(256 + extra)
        extra += b not in keep
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
LATIN1_TO_BYTE_CHAR = str.maketrans({chr(b): c for b, c in BYTE_TO_CHAR.items()})


def byte_level(text: str, at_start: bool, add_prefix_space: bool, use_regex: bool) -> Pieces:
    """ByteLevel (pre_tokenizers/byte_level.rs): optionally prefix a space, split with the GPT-2 pattern, then spell
    each piece's UTF-8 bytes with the byte -> character table."""
    if add_prefix_space and not text.startswith(" "):
        text = " " + text
    pieces = split_pieces(text, at_start, compile_regex(GPT2_PATTERN), "Isolated") if use_regex else [(text, at_start)]
    return [(p.encode("utf-8").decode("latin-1").translate(LATIN1_TO_BYTE_CHAR), first) for p, first in pieces]


def metaspace(text: str, at_start: bool, replacement: str, prepend_scheme: str, split: bool) -> Pieces:
    """Metaspace (pre_tokenizers/metaspace.rs): spaces become `replacement`, which is prepended always or, for
    "first", only to a piece at offset 0 of the text; then split before each replacement (MergedWithNext)."""
    text = text.replace(" ", replacement)
    prepend = prepend_scheme == "always" or (prepend_scheme == "first" and at_start)
    if prepend and not text.startswith(replacement):
        text = replacement + text
    if not split:
        return [(text, at_start)]
    return split_pieces(text, at_start, re.compile(re.escape(replacement)), "MergedWithNext")


def build_pre_tokenizer(cfg: dict | None, where: str) -> PreTokenizer | None:
    """ByteLevel, Digits (digits.rs: Rust's char::is_numeric = categories Nd/Nl/No, one by one or in runs),
    Split (split.rs: regex or literal, any behavior, invert), Metaspace, Sequence (sequence.rs)."""
    if cfg is None:
        return None
    kind = cfg.get("type")
    if kind == "Sequence":
        steps = [build_pre_tokenizer(c, where) for c in cfg["pretokenizers"]]

        def sequence(text: str, at_start: bool) -> Pieces:
            pieces = [(text, at_start)]
            for step in steps:
                pieces = [out for piece in pieces for out in step(*piece)]
            return pieces
        return sequence
    if kind == "ByteLevel":
        return functools.partial(byte_level, add_prefix_space=cfg.get("add_prefix_space", True),
                                 use_regex=cfg.get("use_regex", True))
    if kind == "Digits":
        regex = compile_regex(r"\p{N}" if cfg.get("individual_digits", False) else r"\p{N}+")
        return functools.partial(split_pieces, regex=regex, behavior="Isolated")
    if kind == "Split":
        if cfg["behavior"] not in SPLIT_BEHAVIORS:
            raise ValueError(f"{where}: unknown Split behavior {cfg['behavior']!r} (expected {SPLIT_BEHAVIORS})")
        return functools.partial(split_pieces, regex=pattern_regex(cfg["pattern"], where), behavior=cfg["behavior"],
                                 invert=cfg.get("invert", False))
    if kind == "Metaspace":
        # Older files say add_prefix_space instead of prepend_scheme; false means "never".
        scheme = cfg.get("prepend_scheme", "always" if cfg.get("add_prefix_space", True) else "never")
        if scheme not in ("always", "first", "never"):
            raise ValueError(f"{where}: unknown Metaspace prepend_scheme {scheme!r} (expected always, first, never)")
        return functools.partial(metaspace, replacement=cfg["replacement"], prepend_scheme=scheme,
                                 split=cfg.get("split", True))
    raise unsupported(where, "pre_tokenizer", kind, ["ByteLevel", "Digits", "Split", "Metaspace", "Sequence"])


# ---------------------------------------------------------------------------------------------------------------------
# BPE model (tokenizers/src/models/bpe/model.rs and word.rs).
# ---------------------------------------------------------------------------------------------------------------------

class BPE:
    """Byte-pair encoding of one pre-token: characters (or their <0xHH> byte tokens, or unk) first, then repeatedly
    merge the adjacent pair of lowest merge rank. Results are cached per pre-token."""

    def __init__(self, cfg: dict, where: str) -> None:
        if cfg.get("type", "BPE") != "BPE":
            raise unsupported(where, "model", cfg.get("type"), ["BPE"])
        if cfg.get("dropout") not in (None, 0.0):
            raise ValueError(f"{where}: BPE dropout {cfg['dropout']} is not supported (encoding must be deterministic)")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if cfg.get(key):
                raise ValueError(f"{where}: BPE {key}={cfg[key]!r} is not supported (no family used here sets it)")
        self.vocab = cfg["vocab"]
        self.unk_token = cfg.get("unk_token")
        if self.unk_token is not None and self.unk_token not in self.vocab:
            raise ValueError(f"{where}: BPE unk_token {self.unk_token!r} is not in the vocabulary")
        self.fuse_unk = cfg.get("fuse_unk", False)
        self.byte_fallback = cfg.get("byte_fallback", False)
        self.ignore_merges = cfg.get("ignore_merges", False)
        # Merges are "a b" strings (tokenizers < 0.20) or ["a", "b"] pairs; (a, b) -> (rank, a + b). A repeated pair
        # keeps its last rank, as the Rust HashMap does.
        self.merges = {}
        for rank, merge in enumerate(cfg["merges"]):
            pair = tuple(merge.split(" ") if isinstance(merge, str) else merge)
            if len(pair) != 2 or any(p not in self.vocab for p in (*pair, pair[0] + pair[1])):
                raise ValueError(f"{where}: bad merge #{rank} {merge!r} (needs two parts in the vocab, and their join)")
            self.merges[pair] = (rank, pair[0] + pair[1])
        self.byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        self.tokenize = functools.lru_cache(maxsize=1 << 16)(self._tokenize)

    def _tokenize(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token (model.rs, `tokenize_with_cache` and `merge_word`)."""
        if self.ignore_merges and word in self.vocab:
            return (self.vocab[word],)
        symbols, pending_unk = [], False
        for ch in word:
            if ch in self.vocab:
                if pending_unk:
                    symbols.append(self.unk_token)
                    pending_unk = False
                symbols.append(ch)
                continue
            if self.byte_fallback:
                byte_tokens = [self.byte_tokens[b] for b in ch.encode("utf-8")]
                if all(t in self.vocab for t in byte_tokens):
                    symbols.extend(byte_tokens)  # a pending unk stays pending here, exactly as in model.rs
                    continue
            if self.unk_token is not None:  # without an unk token the character is dropped, as in model.rs
                if pending_unk and not self.fuse_unk:
                    symbols.append(self.unk_token)
                pending_unk = True
        if pending_unk:
            symbols.append(self.unk_token)
        return tuple(self.vocab[s] for s in self.merge(symbols))

    def merge(self, symbols: list[str]) -> list[str]:
        """Word::merge_all (word.rs): a heap of (rank, position) over adjacent pairs; pop the lowest, skip it when
        stale (its pair no longer forms the same token), merge, and push the new pairs with both neighbours."""
        merges, n = self.merges, len(symbols)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(merges[pair][0], i, merges[pair][1]) for i, pair in enumerate(zip(symbols, symbols[1:]))
                if pair in merges]
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] is None or j >= n or merges.get((symbols[i], symbols[j]), (0, None))[1] != new:
                continue
            symbols[i], symbols[j] = new, None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            left, right = prv[i], nxt[i]
            if left >= 0 and (symbols[left], new) in merges:
                rank, merged = merges[symbols[left], new]
                heapq.heappush(heap, (rank, left, merged))
            if right < n and (new, symbols[right]) in merges:
                rank, merged = merges[new, symbols[right]]
                heapq.heappush(heap, (rank, i, merged))
        return [s for s in symbols if s is not None]


# ---------------------------------------------------------------------------------------------------------------------
# Decoders: [token, ...] -> [text, ...] (tokenizers/src/decoders/); the final text is the concatenation.
# ---------------------------------------------------------------------------------------------------------------------

Decoder = Callable[[list[str]], list[str]]


def byte_level_decode(tokens: list[str]) -> list[str]:
    """ByteLevel (pre_tokenizers/byte_level.rs): map each token's characters back to bytes (a token with a character
    outside the table, such as an added token, contributes its own UTF-8), then decode with U+FFFD for bad bytes."""
    data = bytearray()
    for token in tokens:
        if all(c in CHAR_TO_BYTE for c in token):
            data.extend(CHAR_TO_BYTE[c] for c in token)
        else:
            data.extend(token.encode("utf-8"))
    return [data.decode("utf-8", errors="replace")]


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_fallback_decode(tokens: list[str]) -> list[str]:
    """ByteFallback (byte_fallback.rs): runs of <0xHH> tokens become their UTF-8 text, or one U+FFFD per byte when
    the run is not valid UTF-8."""
    out, run = [], bytearray()
    for token in [*tokens, None]:
        m = BYTE_TOKEN.fullmatch(token) if token is not None else None
        if m:
            run.append(int(m.group(1), 16))
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(run))
            run = bytearray()
        if token is not None:
            out.append(token)
    return out


def strip_decode(tokens: list[str], content: str, start: int, stop: int) -> list[str]:
    """Strip (strip.rs): remove up to `start` leading and `stop` trailing `content` characters from every token."""
    out = []
    for token in tokens:
        a = 0
        while a < min(start, len(token)) and token[a] == content:
            a += 1
        b = len(token)
        while len(token) - b < stop and b > a and token[b - 1] == content:
            b -= 1
        out.append(token[a:b])
    return out


def metaspace_decode(tokens: list[str], replacement: str, prepend_scheme: str) -> list[str]:
    """Metaspace (pre_tokenizers/metaspace.rs): replacement -> space, except that the first token drops its
    replacement characters when the encoder prepends one."""
    drop_first = prepend_scheme != "never"
    return [t.replace(replacement, "" if i == 0 and drop_first else " ") for i, t in enumerate(tokens)]


def build_decoder(cfg: dict | None, where: str) -> Decoder:
    """ByteLevel, ByteFallback, Fuse (fuse.rs: join all tokens), Strip, Replace (like the normalizer, per token),
    Metaspace, Sequence (sequence.rs). None means tokenizers' default: tokens joined by spaces."""
    if cfg is None:
        return lambda tokens: [" ".join(tokens)]
    kind = cfg.get("type")
    if kind == "ByteLevel":
        return byte_level_decode
    if kind == "ByteFallback":
        return byte_fallback_decode
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Strip":
        return functools.partial(strip_decode, content=cfg["content"], start=cfg["start"], stop=cfg["stop"])
    if kind == "Replace":
        replace = build_normalizer(cfg, where)
        return lambda tokens: [replace(t) for t in tokens]
    if kind == "Metaspace":
        scheme = cfg.get("prepend_scheme", "always" if cfg.get("add_prefix_space", True) else "never")
        return functools.partial(metaspace_decode, replacement=cfg["replacement"], prepend_scheme=scheme)
    if kind == "Sequence":
        steps = [build_decoder(c, where) for c in cfg["decoders"]]
        return lambda tokens: functools.reduce(lambda acc, step: step(acc), steps, tokens)
    raise unsupported(where, "decoder", kind, ["ByteLevel", "ByteFallback", "Fuse", "Strip", "Replace", "Metaspace",
                                               "Sequence"])


# ---------------------------------------------------------------------------------------------------------------------
# Post-processor: the special ids that add_special_tokens puts around a single sequence (tokenizers/src/processors/).
# ---------------------------------------------------------------------------------------------------------------------

def build_post_processor(cfg: dict | None, where: str) -> tuple[list[int], list[int]]:
    """(prefix_ids, suffix_ids) of TemplateProcessing's `single` template (template.rs), e.g. [<s>] + $A. ByteLevel
    (byte_level.rs) only trims offsets, so it adds nothing; Sequence nests its processors."""
    if cfg is None or cfg.get("type") == "ByteLevel":
        return [], []
    kind = cfg.get("type")
    if kind == "TemplateProcessing":
        prefix, suffix, seen_sequence = [], [], False
        for item in cfg["single"]:
            if "Sequence" in item:
                if item["Sequence"]["id"] != "A" or seen_sequence:
                    raise ValueError(f"{where}: TemplateProcessing single template {cfg['single']} must have one $A")
                seen_sequence = True
            else:
                (suffix if seen_sequence else prefix).extend(cfg["special_tokens"][item["SpecialToken"]["id"]]["ids"])
        return prefix, suffix
    if kind == "Sequence":
        prefix, suffix = [], []
        for processor in cfg["processors"]:
            p, s = build_post_processor(processor, where)
            prefix, suffix = p + prefix, suffix + s
        return prefix, suffix
    raise unsupported(where, "post_processor", kind, ["TemplateProcessing", "ByteLevel", "Sequence"])


# ---------------------------------------------------------------------------------------------------------------------
# The Tokenizer class: tokenizer.json plus bos/eos/pad from the tokenizer config; added tokens, encode, decode.
# ---------------------------------------------------------------------------------------------------------------------

ADDED_TOKEN_OPTIONS = ("single_word", "lstrip", "rstrip", "normalized", "special")
AddedMatcher = tuple[re.Pattern[str], dict[str, dict]]  # (regex, {matched text: added token entry})


def is_word_char(c: str) -> bool:
    """Rust regex's \\w: letters, marks, decimal digits, connector punctuation and the joiners (approximately:
    Unicode Alphabetic also holds a few dozen So/Nl characters)."""
    return unicodedata.category(c)[:2] in ("Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "Pc") or \
        c in "\u200c\u200d"


def is_white_space(c: str) -> bool:
    """Rust's char::is_whitespace, i.e. Unicode White_Space (what lstrip and rstrip absorb)."""
    return any(lo <= ord(c) <= hi for lo, hi in WHITE_SPACE)


class Tokenizer:
    """Encode and decode like `tokenizers.Tokenizer.from_file(path)`; bos/eos/pad come from the tokenizer config."""

    def __init__(self, spec: dict, path: str | Path = "tokenizer.json", config: dict | None = None) -> None:
        where = str(path)
        self.model = BPE(spec["model"], where)
        self.normalizer = build_normalizer(spec.get("normalizer"), where)
        self.pre_tokenizer = build_pre_tokenizer(spec.get("pre_tokenizer"), where)
        self.decoder = build_decoder(spec.get("decoder"), where)
        self.prefix_ids, self.suffix_ids = build_post_processor(spec.get("post_processor"), where)
        # Added tokens are matched leftmost-longest, the raw ones on the text and the normalized ones (by their
        # normalized content) on each normalized piece (added_vocabulary.rs, `refresh_added_tokens`). A normalized
        # one also decodes as its normalized content, as tokenizers does (Llama-2's "<mask>" is "▁<mask>").
        added = spec.get("added_tokens", [])
        for t in added:
            if any(key not in t for key in ("id", "content", *ADDED_TOKEN_OPTIONS)):
                raise ValueError(f"{where}: added token {t} lacks one of id, content, {', '.join(ADDED_TOKEN_OPTIONS)}")
        normalize = self.normalizer or (lambda s: s)
        self.added_to_id = {t["content"]: t["id"] for t in added}
        self.id_to_added = {t["id"]: normalize(t["content"]) if t["normalized"] else t["content"] for t in added}
        self.special_ids = {t["id"] for t in added if t["special"]}
        self.id_to_vocab = {i: s for s, i in self.model.vocab.items()}
        self.raw_matcher = self.added_token_matcher([t for t in added if not t["normalized"]], lambda s: s)
        self.normalized_matcher = self.added_token_matcher([t for t in added if t["normalized"]], normalize)
        config = config or {}
        self.bos_id = self.config_token_id(config, "bos_token", where)
        if self.bos_id is None and self.prefix_ids:
            self.bos_id = self.prefix_ids[0]  # no config: the template's leading special token
        self.eos_id = self.config_token_id(config, "eos_token", where)
        pad_id = self.config_token_id(config, "pad_token", where)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.vocab_size = len(self.model.vocab.keys() | self.added_to_id.keys())

    @classmethod
    def from_file(cls, path: str | Path, config: dict | None = None) -> "Tokenizer":
        """Load a tokenizer.json; `config` is a dict like tokenizer_config.json (bos_token, eos_token, pad_token)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found (pass the file a Hugging Face model ships)")
        return cls(json.loads(path.read_text(encoding="utf-8")), path, config)

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tokenizer":
        """Load folder/tokenizer.json; bos/eos/pad from tokenizer_config.json, else from special_tokens_map.json."""
        folder = Path(folder).expanduser()
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
            if (folder / name).is_file():
                entries = json.loads((folder / name).read_text(encoding="utf-8"))
                config.update({k: v for k, v in entries.items() if k.endswith("_token") and v is not None})
        return cls.from_file(folder / "tokenizer.json", config)

    def config_token_id(self, config: dict, key: str, where: str) -> int | None:
        """Id of config[key], a token string or a dict with "content"; None when the config does not name one."""
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{where}: {key} {token!r} from the tokenizer config is not in the vocabulary")
        return token_id

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (added tokens first, as tokenizers does); None when unknown."""
        return self.added_to_id.get(token, self.model.vocab.get(token))

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, as the decoder sees it; None when unknown."""
        return self.id_to_added.get(token_id, self.id_to_vocab.get(token_id))

    def added_token_matcher(self, tokens: list[dict], normalize: Normalizer) -> AddedMatcher | None:
        """(regex, {matched text: token}) for a set of added tokens; longest alternatives first, so that `re`'s
        leftmost-first search becomes leftmost-longest (aho-corasick's MatchKind::LeftmostLongest)."""
        by_text = {}
        for t in tokens:
            by_text.setdefault(normalize(t["content"]), t)
        by_text.pop("", None)
        if not by_text:
            return None
        regex = re.compile("|".join(re.escape(s) for s in sorted(by_text, key=len, reverse=True)))
        return regex, by_text

    def split_added(self, text: str, at_start: bool,
                    matcher: AddedMatcher | None) -> list[tuple[str, int | None, bool]]:
        """AddedVocabulary::find_matches (added_vocabulary.rs): [(piece, token id or None, at_start)], honouring
        single_word (no word character on either side), lstrip and rstrip (absorb whitespace on that side)."""
        if matcher is None:
            return [(text, None, at_start)] if text else []
        regex, by_text = matcher
        pieces, offset = [], 0
        for m in regex.finditer(text):
            token, start, stop = by_text[m.group()], m.start(), m.end()
            word_before = start > 0 and is_word_char(text[start - 1])
            if token["single_word"] and (word_before or (stop < len(text) and is_word_char(text[stop]))):
                continue
            if token["lstrip"]:
                while start > offset and is_white_space(text[start - 1]):
                    start -= 1
            if token["rstrip"]:
                while stop < len(text) and is_white_space(text[stop]):
                    stop += 1
            if start > offset:
                pieces.append((text[offset:start], None, at_start and offset == 0))
            pieces.append((text[start:stop], self.added_to_id[token["content"]], False))
            offset = stop
        if offset < len(text):
            pieces.append((text[offset:], None, at_start and offset == 0))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, equal to tokenizers' `Tokenizer.encode(text, add_special_tokens).ids`."""
        ids = []
        for raw, raw_id, raw_at_start in self.split_added(text, True, self.raw_matcher):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            normalized = self.normalizer(raw) if self.normalizer else raw
            for piece, token_id, at_start in self.split_added(normalized, raw_at_start, self.normalized_matcher):
                if token_id is not None:
                    ids.append(token_id)
                    continue
                words = self.pre_tokenizer(piece, at_start) if self.pre_tokenizer else [(piece, at_start)]
                for word, _ in words:
                    ids.extend(self.model.tokenize(word))
        return self.prefix_ids + ids + self.suffix_ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` through the decoder chain; ids outside the vocabulary are skipped, as tokenizers does."""
        tokens = [self.id_to_token(i) for i in ids if not (skip_special_tokens and i in self.special_ids)]
        return "".join(self.decoder([t for t in tokens if t is not None]))

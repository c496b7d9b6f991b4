"""MATH as an evaluation task of the trainer (as data.GSM8K): MetaMath's MATH test file, GSM8K's evaluation prompt
(the authors' MATH_eval.py uses the same one), the \\boxed{} reference answers and the grader of
machinery/math_grader.py, with the accuracy by subject and by level.
"""

from pathlib import Path

import data
from machinery import datasets
from machinery.input_files import jsonl_records, text_fields
from machinery.math_grader import reference_answer, score_math


def load_math(path: str | Path) -> list[dict]:
    """MetaMath's MATH test file (MATH_test.jsonl, 5000 problems): JSON lines with string fields instruction (the
    problem) and output (the reference solution), and, when the file has them, type (the subject) and level. Returns
    dicts with keys question (the instruction), answer (the inside of the last \\boxed{...} of output, see
    reference_answer), and subject and level when present. A solution without a \\boxed{...} answer is an error naming
    its file and line (theirs silently scored that problem as wrong)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MATH test file {path} not found (MetaMath's MATH_test.jsonl)")
    problems = []
    for where, record in jsonl_records(path):
        row = text_fields(record, ("instruction", "output"), where)
        answer = reference_answer(row["output"])
        if answer is None:
            raise ValueError(f"{where}: the reference solution has no \\boxed{{...}} answer (its end: "
                             f"{row['output'][-80:]!r}); fix the line or remove it")
        problem = {"question": row["instruction"], "answer": answer}
        problem.update({name: str(record[key]) for key, name in (("type", "subject"), ("level", "level"))
                        if key in record})
        problems.append(problem)
    return problems


def score_math_rows(rows: list[dict]) -> tuple[dict, list[dict]]:
    """data.score_rows with math_grader.score_math: scored correctly with what the authors' is_equiv fallback gives
    beside it (the figure comparable with their published MATH numbers), and the accuracy by subject and by level
    when the file has them."""
    metrics, rows = data.score_rows(score_math, rows)
    for field in ("subject", "level"):
        if all(field in r for r in rows):
            verdicts = {}
            for r in rows:
                verdicts.setdefault(r[field], []).append(r["correct"])
            metrics[f"by_{field}"] = {value: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)}
                                      for value, v in sorted(verdicts.items())}
    return metrics, rows


def fallback_remark(metrics: dict) -> str:
    return (f"; with the authors' is_equiv fallback {metrics['accuracy_authors_fallback']:.2%} "
            f"({metrics['changed_by_authors_fallback']} verdicts flipped)")


MATH = data.EvalTask("math", "MATH", lambda args: datasets.math_file(args.math_path), load_math,
                     lambda record: data.eval_prompt(record["question"]), "math_max_new_tokens",
                     lambda record: record["answer"], score_math_rows, "predictions_math.jsonl",
                     row_fields=("subject", "level"), remark=fallback_remark)

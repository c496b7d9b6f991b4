"""The commonsense reasoning tasks, as the authors train and evaluate them (train_cr.py, utils/data_utils.py and
instruction_tuning_eval/commonsense_eval.py, after AGI-Edgerunners/LLM-Adapters): records {instruction, input, output,
answer}, where output is "the correct answer is X" and answer is X. One prompt for training and evaluation (theirs
indents the training prompt by accident; commonsense_prompt reproduces it on request); an answer is the first match
of the task's pattern in the completion. Each task is an evaluation task of the trainer (TASKS, as data.GSM8K).
"""

import json
import re
from functools import partial
from pathlib import Path

import data
from machinery import datasets
from machinery.input_files import open_regular, text_fields

# Each task's answer pattern, in the paper's table order; social_i_qa has three choices but the authors' pattern five.
ANSWER_PATTERNS = {"boolq": "true|false", "piqa": "solution1|solution2",
                   "social_i_qa": "answer1|answer2|answer3|answer4|answer5",
                   "hellaswag": "ending1|ending2|ending3|ending4", "winogrande": "option1|option2",
                   "ARC-Easy": "answer1|answer2|answer3|answer4|answer5",
                   "ARC-Challenge": "answer1|answer2|answer3|answer4|answer5",
                   "openbookqa": "answer1|answer2|answer3|answer4|answer5"}
# LLM-Adapters' Alpaca prompt: MetaMath's (data.METAMATH_PROMPT) with the response on a line of its own.
ALPACA_PROMPT = data.METAMATH_PROMPT + "\n"
ALPACA_INPUT_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
AUTHORS_INDENT = " " * 12  # their training prompt is an indented f-string: 12 spaces open its lines after the first


def commonsense_prompt(record: dict, indent: str = "") -> str:
    """The Alpaca prompt of a record, with its ### Input section when the record has a non-empty input; the response
    (the record's output, in training) follows it directly. indent=AUTHORS_INDENT gives the authors' training prompt:
    every non-blank line of the template after the first starts with 12 spaces (the record's own text is not
    indented), while their evaluation prompt has none."""
    template = ALPACA_INPUT_PROMPT if record.get("input") else ALPACA_PROMPT
    if indent:
        template = re.sub(r"\n(?!\n)", "\n" + indent, template)
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def commonsense_prediction(task: str, completion: str) -> str | None:
    """The first match of the task's answer pattern in the lower-cased completion; None when there is none."""
    match = re.search(ANSWER_PATTERNS[task], completion.strip().lower())
    return match.group() if match else None


def score_commonsense(task: str, completions: list[str], answers: list[str]) -> dict:
    """Accuracy of completions (already cut at the stop strings) against the records' answers, as data.score_gsm8k:
    a completion without a match (invalid) counts as wrong."""
    if len(completions) != len(answers) or not answers:
        raise ValueError(f"need as many completions as answers, at least one; got {len(completions)} and "
                         f"{len(answers)}")
    preds = [commonsense_prediction(task, c) for c in completions]
    hits = [p == a for p, a in zip(preds, answers)]
    return {"accuracy": sum(hits) / len(answers), "correct": sum(hits), "invalid": preds.count(None),
            "total": len(answers), "extracted": preds, "is_correct": hits}


def load_commonsense(path: str | Path, task: str | None = None) -> list[dict]:
    """The records of a commonsense JSON list (a task's test.json or train.json, or commonsense_170k.json), as dicts
    with string fields instruction, input ("" when absent), output and answer. Given a task, every answer must be one
    its pattern can match: the test would count it wrong whatever the model said."""
    path = Path(path)
    with open_regular(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    rows = []
    for i, record in enumerate(records):
        where = f"{path}[{i}]"
        row = text_fields(record, ("instruction", "output", "answer"), where)
        row["input"] = record.get("input") or ""
        if not isinstance(row["input"], str):
            raise ValueError(f"{where}: field 'input' must be a string, got {type(row['input']).__name__}")
        if task and not re.fullmatch(ANSWER_PATTERNS[task], row["answer"]):
            raise ValueError(f"{where}: answer {row['answer']!r} is none of {task}'s ({ANSWER_PATTERNS[task]})")
        rows.append(row)
    return rows


def task(name: str) -> data.EvalTask:
    """A commonsense task as the trainer evaluates it; the held-out loss is on its answers ("the correct answer
    is ...") after the evaluation prompt."""
    return data.EvalTask(
        name, name, lambda args: datasets.commonsense_test_file(name, args.commonsense_dir),
        partial(load_commonsense, task=name), commonsense_prompt, "commonsense_max_new_tokens",
        lambda record: record["answer"], partial(data.score_rows, partial(score_commonsense, name)),
        f"predictions_{name}.jsonl", question="instruction",
        held_out_pair=lambda record: (commonsense_prompt(record), record["output"]),
        held_out_what="commonsense test answers of {sets}")


TASKS = {name: task(name) for name in ANSWER_PATTERNS}

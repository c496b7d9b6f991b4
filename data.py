"""Data for LoRA-SB: the authors' GSM8K / MetaMathQA protocol (prompts, training targets, answer extraction and
scoring), GSM8K as an evaluation task, loading the dataset files, tokenization with response-only labels, and
resumable batching.

The protocol follows the official code (github.com/CERT-Lab/lora-sb): training data and labels as in
`train_arithmetic.py` / `utils/data_utils.py`, evaluation prompt, stop strings and answer extraction as in
`instruction_tuning_eval/gsm8k_eval.py`, and the lenient comparison from its `grader.py::math_equal`. Every quirk of
theirs that changes a number is kept and named where it happens. The other evaluation tasks are described the same
way beside their graders: MATH in machinery/math_task.py, the commonsense tasks in machinery/commonsense.py. The
tokenizer.json implementation is machinery/tokenizer.py; reading files safely is machinery/input_files.py.

Reading order: prompts and training targets -> GSM8K scoring -> evaluation tasks -> datasets -> tokenized examples
with response-only labels -> batching. Needs torch, numpy and tqdm.
"""

import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from tqdm import tqdm

from machinery import datasets
from machinery.input_files import jsonl_records, open_regular, read_jsonl, text_fields, utf8_lines
from machinery.math_grader import ANSWER_PREFIX  # "The answer is: ", where MATH's evaluation reads answers too

if TYPE_CHECKING:
    from machinery.tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and training targets (train_arithmetic.py, utils/data_utils.py; MetaMath's Alpaca-style prompt).
# ---------------------------------------------------------------------------------------------------------------------

# MetaMath's Alpaca-style prompt: the response follows "### Response:" on the same line (the commonsense tasks' Alpaca
# prompt, machinery/commonsense.py, puts it on a line of its own).
METAMATH_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
EVAL_PROMPT = METAMATH_PROMPT + " Let's think step by step."  # gsm8k_eval.py: one space, no newline


def eval_prompt(question: str) -> str:
    """The evaluation prompt for one GSM8K question."""
    return EVAL_PROMPT.format(instruction=question)


def gsm8k_pair(record: dict) -> tuple[str, str]:
    """A GSM8K record as a (prompt, response) training pair (also what the held-out loss is measured on)."""
    return METAMATH_PROMPT.format(instruction=record["question"]), gsm8k_response(record["answer"])


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


def score_gsm8k(completions: list[str], golds: list[float]) -> dict:
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
# Evaluation tasks (as nanochat's tasks/): what the trainer needs to evaluate a test set, GSM8K's the reference case.
# ---------------------------------------------------------------------------------------------------------------------

# A scorer's per-answer lists (score_gsm8k, math_grader.score_math, commonsense.score_commonsense) -> the fields of
# each prediction row.
PER_ANSWER = {"extracted": "extracted", "is_correct": "correct",
              "is_correct_authors_fallback": "correct_authors_fallback"}


def score_rows(score: Callable[[list, list], dict], rows: list[dict]) -> tuple[dict, list[dict]]:
    """Score the rows' completions against their gold answers with `score`: its metrics (accuracy, correct, invalid,
    total, ...), and the rows with each answer's extracted value and verdict(s)."""
    scored = score([r["completion"] for r in rows], [r["gold"] for r in rows])
    per_answer = {PER_ANSWER[key]: scored.pop(key) for key in PER_ANSWER if key in scored}
    return scored, [{**r, **{name: values[i] for name, values in per_answer.items()}} for i, r in enumerate(rows)]


@dataclass(frozen=True)
class EvalTask:
    """One evaluation set: where its test file is, how it is read, the prompt of a record, the trainer option that
    sets its new-token budget, the gold answer of a record, how answers are scored and where they are written. The
    trainer evaluates each task it is given the same way; adding one is writing its EvalTask and naming it in the
    trainer's EVAL_TASKS."""
    name: str  # as --eval_data and summary.json name it
    title: str  # as the printed summary names it
    test_file: Callable[[object], Path]  # the trainer's arguments -> the test file (local, or downloaded)
    load: Callable[[Path], list[dict]]  # the test file's records
    prompt: Callable[[dict], str]  # a record's evaluation prompt
    max_new_tokens: str  # the trainer option that sets the new-token budget of an answer
    gold: Callable[[dict], object]  # a record's reference answer, as the scorer compares it
    score: Callable[[list[dict]], tuple[dict, list[dict]]]  # prediction rows -> metrics, rows with verdicts
    predictions: str  # the file of its scored answers in --out_dir
    question: str = "question"  # the record field a prediction row shows as its question
    row_fields: tuple[str, ...] = ()  # record fields copied into the prediction rows when present
    held_out_pair: Callable[[dict], tuple[str, str]] | None = None  # a record as (prompt, response), for the loss
    held_out_what: str = ""  # what the held-out loss is on, {sets} standing for the evaluated sets' names
    remark: Callable[[dict], str] = lambda metrics: ""  # what the printed summary adds to the accuracy line


GSM8K = EvalTask("gsm8k", "GSM8K", lambda args: datasets.gsm8k_dir(args.data_dir) / "test.jsonl",
                 lambda path: load_gsm8k("test", path.parent), lambda record: eval_prompt(record["question"]),
                 "max_new_tokens", lambda record: gold_answer(record["answer"]), partial(score_rows, score_gsm8k),
                 "predictions.jsonl", held_out_pair=gsm8k_pair, held_out_what="GSM8K test solutions")


# ---------------------------------------------------------------------------------------------------------------------
# Datasets: GSM8K (the official jsonl files), MetaMathQA (the hub's JSON list, or JSON lines) and MetaMath's MATH test
# file, checked per record.
# ---------------------------------------------------------------------------------------------------------------------

def load_gsm8k(split: str, data_dir: str | Path) -> list[dict]:
    """GSM8K `split` ("train": 7473, "test": 1319) from `data_dir/{split}.jsonl`, as dicts with keys question, answer.
    An answer without a final "#### N" line (N an integer, as gold_answer reads it) is an error naming its file and
    line, found here rather than when the answer is scored or turned into a training target."""
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: GSM8K's folder holds train.jsonl and test.jsonl")
    rows = []
    for where, record in jsonl_records(path):
        row = text_fields(record, ("question", "answer"), where)
        try:
            gold_answer(row["answer"])
        except ValueError:
            raise ValueError(f"{where}: the answer does not end with a '#### N' line where N is an integer (its end: "
                             f"{row['answer'][-80:]!r}); fix the line or remove it") from None
        rows.append(row)
    return rows


def load_metamathqa(num_examples: int, path: str | Path) -> list[dict]:
    """The first `num_examples` rows of MetaMathQA in dataset order (the paper: 50000), dicts with keys query, response,
    from `path`: the hub's JSON list (MetaMathQA-395K.json) or JSON lines."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MetaMathQA file {path} not found")
    with open_regular(path, "rb") as f:
        is_json_list = f.read(4096).lstrip().startswith(b"[")
    if is_json_list:
        try:
            records = json.loads("".join(line for _, line in utf8_lines(path)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = [text_fields(r, ("query", "response"), f"{path}[{i}]") for i, r in enumerate(records[:num_examples])]
    else:
        rows = read_jsonl(path, ("query", "response"), limit=num_examples)
    if len(rows) < num_examples:
        raise ValueError(f"{path} holds {len(rows)} examples, fewer than the {num_examples} requested")
    return rows


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
    shuffle is False) and cuts it into batches of batch_size; the last batch may be smaller. With world_size > 1,
    rank r takes batches r, r + world_size, ... and the num_batches % world_size batches left over are dropped, so all
    ranks run the same number of steps (an uneven count hangs DDP).

    next_batch() returns the batch at (epoch, position) and advances, rolling over into the next epoch; it is what a
    trainer that counts steps calls. Iterating yields the rest of the current epoch through next_batch().
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0) -> None:
        if batch_size < 1 or seed < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, seed >= 0 and 0 <= rank < world_size; got "
                             f"batch_size={batch_size}, seed={seed}, rank={rank}, world_size={world_size}")
        if math.ceil(len(examples) / batch_size) < world_size:
            raise ValueError(f"{len(examples)} examples make fewer than one batch of {batch_size} per rank "
                             f"for {world_size} ranks")
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
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
        batches = [order[start:start + bs] for start in range(0, n, bs)]
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

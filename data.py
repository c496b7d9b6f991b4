"""Data for LoRA-SB: the authors' GSM8K / MetaMathQA protocol (prompts, training targets, answer extraction and
scoring) and their commonsense reasoning protocol, loading the dataset files, tokenization with response-only labels,
and resumable batching.

The protocol follows the official code (github.com/CERT-Lab/lora-sb): training data and labels as in
`train_arithmetic.py` / `utils/data_utils.py`, evaluation prompt, stop strings and answer extraction as in
`instruction_tuning_eval/gsm8k_eval.py`, and the lenient comparison from its `grader.py::math_equal`. Every quirk of
theirs that changes a number is kept and named where it happens. MATH is evaluated with the same prompt; its grader
is machinery/math_grader.py, and the tokenizer.json implementation is machinery/tokenizer.py. Commonsense reasoning
follows `train_cr.py` and `instruction_tuning_eval/commonsense_eval.py`, with one prompt for training and evaluation
(theirs indents the training prompt by accident; commonsense_prompt reproduces it on request).

Reading order: prompts and training targets -> GSM8K scoring -> commonsense reasoning -> datasets -> tokenized
examples with response-only labels -> batching. Needs torch, numpy and tqdm.
"""

import itertools
import json
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from machinery.input_files import open_regular
from machinery.math_grader import reference_answer

if TYPE_CHECKING:
    from machinery.tokenizer import Tokenizer


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
# Commonsense reasoning (train_cr.py, utils/data_utils.py and instruction_tuning_eval/commonsense_eval.py, after
# AGI-Edgerunners/LLM-Adapters): records {instruction, input, output, answer}; output is "the correct answer is X".
# ---------------------------------------------------------------------------------------------------------------------

# Each task's answer pattern, in the paper's table order; social_i_qa has three choices but the authors' pattern five.
COMMONSENSE_TASKS = {"boolq": "true|false", "piqa": "solution1|solution2",
                     "social_i_qa": "answer1|answer2|answer3|answer4|answer5",
                     "hellaswag": "ending1|ending2|ending3|ending4", "winogrande": "option1|option2",
                     "ARC-Easy": "answer1|answer2|answer3|answer4|answer5",
                     "ARC-Challenge": "answer1|answer2|answer3|answer4|answer5",
                     "openbookqa": "answer1|answer2|answer3|answer4|answer5"}
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
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
    match = re.search(COMMONSENSE_TASKS[task], completion.strip().lower())
    return match.group() if match else None


def score_commonsense(task: str, completions: list[str], answers: list[str]) -> dict:
    """Accuracy of completions (already cut at the stop strings) against the records' answers, as score_gsm8k: a
    completion without a match (invalid) counts as wrong."""
    if len(completions) != len(answers) or not answers:
        raise ValueError(f"need as many completions as answers, at least one; got {len(completions)} and "
                         f"{len(answers)}")
    preds = [commonsense_prediction(task, c) for c in completions]
    hits = [p == a for p, a in zip(preds, answers)]
    return {"accuracy": sum(hits) / len(answers), "correct": sum(hits), "invalid": preds.count(None),
            "total": len(answers), "extracted": preds, "is_correct": hits}


# ---------------------------------------------------------------------------------------------------------------------
# Datasets: GSM8K (the official jsonl files), MetaMathQA (the hub's JSON list, or JSON lines) and MetaMath's MATH test
# file, checked per record.
# ---------------------------------------------------------------------------------------------------------------------

def _check_row(row: object, keys: tuple[str, ...], where: str) -> dict:
    """The `keys` of one record (each a string that is text), or a ValueError naming file:line / file[index]."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(keys)}, got {type(row).__name__}")
    for key in keys:
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: missing string field {key!r} (keys are {sorted(row)})")
        try:  # a JSON escape such as "\ud800" decodes to a lone surrogate, which no tokenizer or file can take
            row[key].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: field {key!r} holds a lone surrogate {row[key][e.start]!r} at character "
                             f"{e.start + 1} (an unpaired \\ud800-\\udfff escape), which is not text") from None
    return {key: row[key] for key in keys}


def utf8_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line of a text file, decoded as UTF-8 line by line, so that a byte that is not
    UTF-8 is a ValueError naming the file and the line. Only a regular file is opened: a FIFO would block forever."""
    with open_regular(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at byte "
                                 f"{e.start + 1} of the line): save the file as UTF-8") from None
            yield lineno, line


def jsonl_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each line of a JSON-lines file but blank ones; where is "file:line", for error messages."""
    for lineno, line in utf8_lines(path):
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
    An answer without a final "#### N" line (N an integer, as gold_answer reads it) is an error naming its file and
    line, found here rather than when the answer is scored or turned into a training target.
    (train_gsm8k.py downloads the official files into a cache folder when no --data_dir is given.)"""
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --data_dir must hold GSM8K's train.jsonl and test.jsonl "
                                "(or leave --data_dir out to download them)")
    rows = []
    for where, record in jsonl_records(path):
        row = _check_row(record, ("question", "answer"), where)
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
    if not path.exists():
        raise FileNotFoundError(f"MATH test file {path} not found (MetaMath's MATH_test.jsonl; leave --math_path "
                                "out to download it)")
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
        row = _check_row(record, ("instruction", "output", "answer"), where)
        row["input"] = record.get("input") or ""
        if not isinstance(row["input"], str):
            raise ValueError(f"{where}: field 'input' must be a string, got {type(row['input']).__name__}")
        if task and not re.fullmatch(COMMONSENSE_TASKS[task], row["answer"]):
            raise ValueError(f"{where}: answer {row['answer']!r} is none of {task}'s ({COMMONSENSE_TASKS[task]})")
        rows.append(row)
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

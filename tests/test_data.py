"""Tests of data.py (and of the file loaders of machinery/math_task.py and commonsense.py): GSM8K / MetaMathQA / MATH
file loading, the authors' prompt format and label rule, resumable batching, and the authors' GSM8K scoring rules."""

import json
import os
import random
import re
import warnings

import pytest
import torch

import data
from machinery import commonsense, math_task
from machinery.tokenizer import Tokenizer

from conftest import GSM8K_DIR, SMOLLM2_DIR, TINY_MATH, deadline, needs_gsm8k, needs_smollm2, write_tiny_math
from machinery.files import sha256_file

# the first GSM8K test problem, verbatim
JANET_Q = ("Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
           "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
           "duck egg. How much in dollars does she make every day at the farmers' market?")
JANET_A = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the "
           "farmer\u2019s market.\n#### 18")


class ByteTokenizer:
    """Stand-in tokenizer: UTF-8 bytes, with BOS 256 in front; EOS 257 doubles as pad (as in the authors' setup)."""

    bos_id, eos_id, pad_id = 256, 257, 257

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_id] if add_special_tokens else []) + list(text.encode("utf-8"))


class MergingTokenizer(ByteTokenizer):
    """Like ByteTokenizer, but ':' followed by a letter is one token (id 300 + letter), as some tokenizers merge."""

    def encode(self, text, add_special_tokens=True):
        ids, raw, i = [self.bos_id] if add_special_tokens else [], text.encode("utf-8"), 0
        while i < len(raw):
            if raw[i] == ord(":") and i + 1 < len(raw) and chr(raw[i + 1]).isalpha():
                ids.append(300 + raw[i + 1])
                i += 2
            else:
                ids.append(raw[i])
                i += 1
        return ids


# -----------------------------------------------------------------------------
# GSM8K, MetaMathQA and the MATH test file


@needs_gsm8k
def test_load_gsm8k_from_a_local_dir():
    train, test = data.load_gsm8k("train", GSM8K_DIR), data.load_gsm8k("test", GSM8K_DIR)
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0] == {"question": JANET_Q, "answer": JANET_A}


def test_load_gsm8k_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl not found"):
        data.load_gsm8k("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load_gsm8k("validation", tmp_path)
    good = json.dumps({"question": "q", "answer": "a\n#### 1"})
    cases = [([good, "{not json"], "train.jsonl:2"),
             ([good, "", good, '{"question": "q"}'], "train.jsonl:4"),  # blank lines still count
             (["[1, 2]"], "train.jsonl:1"),
             ([json.dumps({"question": "q", "answer": 3})], "train.jsonl:1")]
    for lines, where in cases:
        (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=where):
            data.load_gsm8k("train", tmp_path)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("answer", ["She has 3.", "She has 3.\n#### abc", "#### 3 apples", "#### 1.5"])
def test_a_gsm8k_answer_without_an_integer_final_line_is_refused_at_load_naming_file_and_line(tmp_path, split, answer):
    good = json.dumps({"question": "q", "answer": "a\n#### 1,234"})
    (tmp_path / f"{split}.jsonl").write_text("\n".join([good, good, json.dumps({"question": "q", "answer": answer})]))
    with pytest.raises(ValueError, match=rf"{split}\.jsonl:3: the answer does not end with a '#### N' line where N is "
                                         rf"an integer \(its end: {re.escape(repr(answer))}\)"):
        data.load_gsm8k(split, tmp_path)


def loader_cases(tmp_path):
    """(file, a loader of it, a good record) for each data file: GSM8K train and test, MetaMathQA as JSON lines and
    as the hub's JSON list (one record a line here, after the "[" line), and MATH."""
    gsm8k = {"question": "q", "answer": "a\n#### 1"}
    metamath = {"query": "q", "response": "r\nThe answer is: 1"}
    return [(tmp_path / "train.jsonl", lambda p: data.load_gsm8k("train", p.parent), gsm8k),
            (tmp_path / "test.jsonl", lambda p: data.load_gsm8k("test", p.parent), gsm8k),
            (tmp_path / "m.jsonl", lambda p: data.load_metamathqa(3, p), metamath),
            (tmp_path / "m.json", lambda p: data.load_metamathqa(3, p), metamath),
            (tmp_path / "MATH_test.jsonl", math_task.load_math, {"instruction": "q", "output": "\\boxed{1}"})]


def write_records(path, records: list[bytes]) -> None:
    """JSON lines, or for a .json file a JSON list with the first record on line 2."""
    if path.suffix == ".json":
        path.write_bytes(b"[\n" + b",\n".join(records) + b"\n]\n")
    else:
        path.write_bytes(b"\n".join(records) + b"\n")


@pytest.mark.parametrize("case", range(5))
def test_bytes_that_are_not_utf8_are_refused_naming_file_and_line(tmp_path, case):
    path, load, good = loader_cases(tmp_path)[case]
    key = list(good)[0]
    bad = json.dumps({**good, key: "caf@"}).encode().replace(b"@", b"\xe9")  # Latin-1, not UTF-8
    write_records(path, [json.dumps(good).encode(), bad, json.dumps(good).encode()])
    line = 3 if path.suffix == ".json" else 2
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:{line}: not UTF-8 text \(byte b'\\xe9'"):
        load(path)
    write_records(path, [json.dumps(good).encode(), json.dumps({**good, key: "café"}).encode(),
                         json.dumps(good).encode()])
    assert load(path)[1]["question" if key == "instruction" else key] == "café"  # UTF-8 text is read as before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("case", range(6))
def test_a_fifo_as_a_data_file_is_refused_without_blocking(tmp_path, case):
    """Every loader (loader_cases' and a commonsense task's), and the sha256 that a run's identity records of each
    training data file."""
    path, load = [*[(path, load) for path, load, _ in loader_cases(tmp_path)],
                  (tmp_path / "piqa" / "train.json", commonsense.load_commonsense)][case]
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    for read in (load, sha256_file):
        with deadline(5), pytest.raises(ValueError, match=f"{re.escape(str(path))} is a FIFO .*not a regular file"):
            read(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_in_a_local_data_folder_is_taken_and_refused_not_skipped_for_a_download(tmp_path):
    from machinery import datasets

    for task_file in (tmp_path / "commonsense_170k.json", tmp_path / "piqa" / "test.json"):
        task_file.parent.mkdir(exist_ok=True)
        os.mkfifo(task_file)
    assert datasets.commonsense_train_files(str(tmp_path)) == [tmp_path / "commonsense_170k.json"]
    assert datasets.commonsense_test_file("piqa", str(tmp_path)) == tmp_path / "piqa" / "test.json"
    with deadline(5), pytest.raises(ValueError, match="is a FIFO"):
        commonsense.load_commonsense(datasets.commonsense_test_file("piqa", str(tmp_path)))


@pytest.mark.parametrize("case", range(5))
def test_a_lone_surrogate_is_refused_naming_file_line_and_field(tmp_path, case):
    path, load, good = loader_cases(tmp_path)[case]
    key = list(good)[-1]
    bad = json.dumps({**good, key: "x"}).replace('"x"', '"ab\\ud800c"').encode()  # the six characters \ud800
    write_records(path, [json.dumps(good).encode(), bad, json.dumps(good).encode()])
    where = re.escape(f"{path}[1]" if path.suffix == ".json" else f"{path}:2")
    with pytest.raises(ValueError, match=rf"{where}: field '{key}' holds a lone surrogate '\\ud800' at character 3"):
        load(path)


def test_load_metamathqa_takes_the_first_rows_in_order(tmp_path):
    rows = [{"query": f"q{i}", "response": f"r{i}\nThe answer is: {i}", "type": "GSM_AnsAug"} for i in range(5)]
    expected = [{"query": r["query"], "response": r["response"]} for r in rows[:3]]
    (tmp_path / "m.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.load_metamathqa(3, tmp_path / "m.json") == expected
    assert data.load_metamathqa(3, tmp_path / "m.jsonl") == expected
    with pytest.raises(ValueError, match="holds 5 examples, fewer than the 6"):
        data.load_metamathqa(6, tmp_path / "m.json")
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], {"query": "q"}]))
    with pytest.raises(ValueError, match=r"bad\.json\[1\].*'response'"):
        data.load_metamathqa(2, tmp_path / "bad.json")


def test_load_math_reads_the_question_the_boxed_answer_subject_and_level(tmp_path):
    problems = math_task.load_math(write_tiny_math(tmp_path / "MATH_test.jsonl"))
    assert [p["question"] for p in problems] == [q for q, _, _, _ in TINY_MATH]
    assert [p["answer"] for p in problems] == ["\\frac{1}{2}", "5", "\\frac{x}{3}", "3"]
    assert problems[0]["subject"] == "Algebra" and problems[0]["level"] == "Level 1"
    bare = tmp_path / "bare.jsonl"  # MetaMath's own file has no level
    bare.write_text(json.dumps({"instruction": "q", "output": "\\boxed{1}"}) + "\n")
    assert math_task.load_math(bare) == [{"question": "q", "answer": "1"}]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    (json.dumps({"instruction": "q"}), r"bad.jsonl:2: missing string field 'output'"),
    (json.dumps({"instruction": "q", "output": "so it is 5."}), r"bad.jsonl:2: .*no \\boxed\{\.\.\.\} answer"),
])
def test_load_math_names_the_file_and_line_of_a_bad_record(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "\\boxed{1}"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        math_task.load_math(path)
    with pytest.raises(FileNotFoundError, match="MATH_test.jsonl"):
        math_task.load_math(tmp_path / "missing.jsonl")


# -----------------------------------------------------------------------------
# prompt format, GSM8K targets, tokenization


def test_prompts_are_the_authors_strings():
    assert data.METAMATH_PROMPT.format(instruction="Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nQ?\n\n### Response:")
    assert data.eval_prompt("Q {x}?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nQ {x}?\n\n### Response: Let's think step by step.")


def test_gsm8k_response_removes_annotations_and_ends_with_the_answer():
    assert data.gsm8k_response(JANET_A) == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every "
                                            "day at the farmer\u2019s market.\nThe answer is: 18")
    with_comma = "1000 + 200 = <<1000+200=1200>>1,200\n#### 1,200"
    assert data.gsm8k_response(with_comma) == "1000 + 200 = 1,200\nThe answer is: 1200"  # comma dropped in the answer
    with pytest.raises(ValueError, match="####"):
        data.gsm8k_response("no final line")


@needs_gsm8k
def test_gsm8k_targets_and_gold_answers_on_every_line():
    for split in ("train", "test"):
        for row in data.load_gsm8k(split, GSM8K_DIR):
            response = data.gsm8k_response(row["answer"])
            gold = data.gold_answer(row["answer"])
            assert "<<" not in response and ">>" not in response and "####" not in response
            assert response.count("\n") == row["answer"].count("\n")
            assert data.extract_answer(response) == gold  # training targets score as correct
            assert gold == int(official_answer(row["answer"]))  # the authors' and the official parser agree


def test_labels_mask_exactly_the_prompt():
    tok, prompt, response = ByteTokenizer(), data.METAMATH_PROMPT.format(instruction="1+1?"), "2\nThe answer is: 2"
    ex = data.tokenize_example(tok, prompt, response, max_length=512)
    n_prompt = 1 + len(prompt.encode())
    assert ex["input_ids"] == [256] + list((prompt + response).encode()) + [257]
    assert ex["labels"] == [-100] * n_prompt + ex["input_ids"][n_prompt:]
    assert ex["labels"][-1] == tok.eos_id and not ex["truncated"] and ex["prompt_is_prefix"]


def test_truncation_cuts_from_the_right_and_is_counted():
    tok = ByteTokenizer()
    pairs = [("P" * 10, "r" * 5), ("P" * 10, "r" * 20), ("P" * 40, "r"), ("P" * 10, "r" * 18)]
    examples, num_truncated = data.tokenize_dataset(tok, pairs, max_length=30)
    assert num_truncated == 2  # 1 + 10 + 20 + 1 = 32 and 1 + 40 + 1 + 1 = 43 exceed 30; 1 + 10 + 18 + 1 = 30 fits
    assert [len(e["input_ids"]) for e in examples] == [17, 30, 30, 30]
    assert examples[1]["input_ids"][-1] != tok.eos_id and examples[3]["input_ids"][-1] == tok.eos_id
    assert examples[1]["labels"] == [-100] * 11 + [ord("r")] * 19
    assert examples[2]["labels"] == [-100] * 30  # the prompt alone is longer than max_length: nothing to learn
    assert set(examples[0]) == {"input_ids", "labels"}


def test_a_label_boundary_that_tokenizes_differently_is_reported():
    tok, prompt = MergingTokenizer(), data.METAMATH_PROMPT.format(instruction="Q")
    ex = data.tokenize_example(tok, prompt, "Janet sells", max_length=512)
    assert not ex["prompt_is_prefix"]
    with pytest.warns(UserWarning, match="1 of 2 prompts"):
        data.tokenize_dataset(tok, [(prompt, "Janet sells"), (prompt, " 9 eggs")], max_length=512)
    no_eos = ByteTokenizer()
    no_eos.eos_id = None
    with pytest.raises(ValueError, match="EOS"):
        data.tokenize_example(no_eos, prompt, "x", max_length=10)


@needs_gsm8k
@needs_smollm2
def test_real_tokenizer_keeps_the_authors_boundary_exact():
    tok = Tokenizer.from_dir(SMOLLM2_DIR)
    rows = data.load_gsm8k("train", GSM8K_DIR)[:200]
    pairs = [(data.METAMATH_PROMPT.format(instruction=r["question"]), data.gsm8k_response(r["answer"])) for r in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a boundary mismatch would warn
        examples, num_truncated = data.tokenize_dataset(tok, pairs, max_length=512)
    assert num_truncated == 0
    for (prompt, response), ex in zip(pairs, examples):
        n_prompt = len(tok.encode(prompt))
        assert ex["labels"][:n_prompt] == [-100] * n_prompt and -100 not in ex["labels"][n_prompt:]
        assert ex["input_ids"][-1] == tok.eos_id
        assert tok.decode(ex["labels"][n_prompt:-1]) == response


# -----------------------------------------------------------------------------
# batching


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """n examples of random length 3..40 whose first token is their index (to track them through batching)."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length, n_prompt = rng.randint(3, 40), rng.randint(1, 2)
        ids = [i] + [rng.randint(0, 99) for _ in range(length - 1)]
        examples.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return examples


def epoch_indices(batches: data.Batches) -> list[list[int]]:
    """The example indices of each batch of the rest of the current epoch, read from the batches themselves."""
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_batches_are_right_padded_with_masks_by_length():
    examples = make_examples(10)
    batch = next(iter(data.Batches(examples, batch_size=4, seed=0, pad_id=-7)))
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool and batch["input_ids"].shape == batch["labels"].shape
    for row in range(4):
        ex = examples[batch["input_ids"][row, 0]]
        n = len(ex["input_ids"])
        assert batch["attention_mask"][row].tolist() == [True] * n + [False] * (batch["input_ids"].shape[1] - n)
        assert batch["input_ids"][row].tolist() == ex["input_ids"] + [-7] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][row].tolist() == ex["labels"] + [-100] * (batch["input_ids"].shape[1] - n)


def test_batch_order_is_a_function_of_seed_and_epoch():
    examples = make_examples(50)
    a, b, other = (data.Batches(examples, batch_size=4, seed=s) for s in (3, 3, 4))
    epoch0, epoch1 = epoch_indices(a), epoch_indices(a)
    assert epoch0 == epoch_indices(b) and epoch1 == epoch_indices(b)
    assert epoch0 != epoch1 and epoch0 != epoch_indices(other)
    for epoch in (epoch0, epoch1):
        assert sorted(i for batch in epoch for i in batch) == list(range(50))
        assert [len(batch) for batch in epoch].count(2) == 1  # 50 = 12 * 4 + 2: one short batch
    assert epoch_indices(data.Batches(examples, batch_size=5, seed=0, shuffle=False))[1] == [5, 6, 7, 8, 9]


def test_ranks_get_disjoint_shards_of_equal_length():
    examples = make_examples(103)  # 26 batches of 4 (the last one 3): 8 per rank, 2 dropped
    ranks = [data.Batches(examples, batch_size=4, seed=1, rank=r, world_size=3)
             for r in range(3)]
    assert [len(b) for b in ranks] == [8, 8, 8] == [len(b.epoch_batches(0)) for b in ranks]
    seen = [i for b in ranks for batch in epoch_indices(b) for i in batch]
    assert len(seen) == len(set(seen)) and len(seen) >= 103 - 2 * 4
    with pytest.raises(ValueError, match="per rank"):
        data.Batches(examples[:7], batch_size=4, seed=0, world_size=3)


@pytest.mark.parametrize("consumed", [5, 24, 37])  # mid-epoch, just before the end of epoch 0 (26 batches), in epoch 1
def test_resume_continues_exactly_where_it_stopped(consumed):
    examples = make_examples(103)
    make = lambda: data.Batches(examples, batch_size=4, seed=7)  # noqa: E731
    uninterrupted = make()
    reference = [uninterrupted.next_batch() for _ in range(consumed + 6)][consumed:]
    stopped = make()
    for _ in range(consumed):
        stopped.next_batch()
    state = json.loads(json.dumps(stopped.state_dict()))  # survives a JSON round trip
    assert state == {"seed": 7, "epoch": consumed // 26, "position": consumed % 26}
    resumed = make()
    resumed.load_state_dict(state)
    for expected, batch in zip(reference, (resumed.next_batch() for _ in range(6))):
        assert all(torch.equal(expected[k], batch[k]) for k in expected)


def test_iterating_yields_the_rest_of_the_epoch():
    batches = data.Batches(make_examples(30), batch_size=4, seed=0)
    assert len(batches) == 8
    first = [batches.next_batch() for _ in range(3)]
    rest = list(batches)
    assert len(first) + len(rest) == 8 and batches.state_dict() == {"seed": 0, "epoch": 1, "position": 0}
    assert len(list(batches)) == 8


def test_load_state_dict_rejects_a_different_run():
    batches = data.Batches(make_examples(30), batch_size=4, seed=0)
    with pytest.raises(ValueError, match="seed 1"):
        batches.load_state_dict({"seed": 1, "epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="outside"):
        batches.load_state_dict({"seed": 0, "epoch": 0, "position": 8})
    with pytest.raises(ValueError, match="missing"):
        batches.load_state_dict({"seed": 0, "epoch": 0})


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("completion, expected", [
    ("so the total is 42.", None),  # no "The answer is: "
    ("The answer is 18", None),  # no colon
    ("The answer is:18", None),  # no space
    ("The answer is: none", None),
    ("The answer is: 5.\nThe answer is: 7", 7),  # the last one counts
    ("The answer is:  42 apples\n", 42),
    ("The answer is: -3", -3),
    ("The answer is: +4", 4),
    ("The answer is: $1,200.", 1200),
    ("The answer is: 1,234,567", 1234),  # one separator only
    ("The answer is: 12,5", 125),
    ("The answer is: 17.6", 18),
    ("The answer is: 2.5", 2),  # banker's rounding
    ("The answer is: 3.5", 4),
    ("The answer is: -2.5", -2),
    ("The answer is: .5", 0),
    ("The answer is: 7/2", 4),  # round(3.5)
    ("The answer is: 5/2", 2),  # round(2.5)
    ("The answer is: -9/4", -2),
    ("The answer is: 3/0", 3),  # the authors' denominator "0" rule
    ("The answer is: 3/00", None),
    ("The answer is: -/4", None),  # their is_number("-") fails
    ("The answer is: " + "9" * 400, None),  # float overflows to inf
    ("The answer is: -" + "9" * 400, None),
])
def test_extract_answer_follows_the_authors_rules(completion, expected):
    assert data.extract_answer(completion) == expected


def test_is_correct_has_the_authors_percentage_leniency():
    assert data.is_correct(18, 18) and data.is_correct(18.0, 18)
    assert data.is_correct(1800, 18) and data.is_correct(18, 1800)  # gold * 100 and gold / 100
    assert data.is_correct(100009, 100000) and not data.is_correct(100011, 100000)  # rel_tol 1e-4
    assert data.is_correct(0, 0) and not data.is_correct(17, 18) and not data.is_correct(None, 18)


def test_score_gsm8k_counts_correct_and_invalid():
    completions = ["x\nThe answer is: 18", "The answer is: 1800", "The answer is 18", "The answer is: 3"]
    result = data.score_gsm8k(completions, [18, 18, 18, 4])
    assert {k: result[k] for k in ("accuracy", "correct", "invalid", "total")} == \
        {"accuracy": 0.5, "correct": 2, "invalid": 1, "total": 4}
    assert result["extracted"] == [18, 1800, None, 3] and result["is_correct"] == [True, True, False, False]
    with pytest.raises(ValueError, match="as many"):
        data.score_gsm8k(completions, [18])


def official_answer(text: str) -> str:
    """The official GSM8K parser (grade-school-math dataset.py), the reference gold_answer is checked against."""
    match = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return match.group(1).strip().replace(",", "") if match else "[invalid]"


def test_gold_and_official_answer_parsing():
    assert data.gold_answer(JANET_A) == 18 and data.gold_answer("x\n#### 1,200") == 1200
    assert data.gold_answer("x\n#### -3") == -3
    assert official_answer("x\n#### 1,200") == "1200" and official_answer("The answer is: 5") == "[invalid]"
    with pytest.raises(ValueError, match="####"):
        data.gold_answer("The answer is: 5")


def test_cut_at_stop_removes_the_stop_string_and_the_rest():
    assert data.cut_at_stop("3 + 4 = 7\nThe answer is: 7\n\n### Instruction:\nNext") == (
        "3 + 4 = 7\nThe answer is: 7\n\n### ", True)
    assert data.cut_at_stop("Responses vary. Instruction: x") == ("", True)  # the earliest stop string wins
    assert data.cut_at_stop("The answer is: 7") == ("The answer is: 7", False)

"""The commonsense reasoning protocol on tiny files the tests write: answer patterns, prompts, the loss mask, a tiny
end-to-end run of the trainer, bad input refused before the model loads, and experiments/commonsense.py --quick."""

import json
import shutil
from pathlib import Path

import pytest

import data
import train_gsm8k
from machinery import commonsense as commonsense_tasks
from machinery.tokenizer import Tokenizer

LABELS = {"boolq": ("true", "false"), "piqa": ("solution1", "solution2"), "ARC-Easy": ("answer1", "answer2", "answer3")}


def write_commonsense(folder, tasks=LABELS, num_train: int = 8, num_test: int = 3):
    """<task>/train.json and <task>/test.json in the authors' layout, short records with an empty input."""
    for task, labels in tasks.items():
        (folder / task).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", num_train), ("test", num_test)):
            records = [{"instruction": f"{task} question {i}? Answer format: {'/'.join(labels)}", "input": "",
                        "output": f"the correct answer is {labels[i % len(labels)]}",
                        "answer": labels[i % len(labels)]} for i in range(n)]
            (folder / task / f"{split}.json").write_text(json.dumps(records))
    return folder


@pytest.mark.parametrize("task, completion, expected", [
    ("boolq", "the correct answer is false. true is wrong", "false"),  # the first match wins
    ("boolq", "The correct answer is TRUE", "true"),  # the output is lower-cased first
    ("boolq", "the correct answer is yes", None),
    ("piqa", "solution2 rather than solution1", "solution2"),
    ("social_i_qa", "Answer5", "answer5"),  # the authors' pattern reads five answers though SIQA has three
    ("social_i_qa", "answer6", None),
    ("ARC-Challenge", "the correct answer is answer3", "answer3"),
    ("openbookqa", "answer 2", None),
    ("hellaswag", "ending4 then ending1", "ending4"),
    ("hellaswag", "ending5", None),
    ("winogrande", "OPTION1", "option1"),
    ("winogrande", "option 2", None),
])
def test_each_task_reads_the_first_match_of_its_pattern(task, completion, expected):
    assert commonsense_tasks.commonsense_prediction(task, completion) == expected


def test_no_match_counts_as_wrong_and_every_answer_is_compared_exactly():
    scored = commonsense_tasks.score_commonsense("boolq", ["true", "nothing", "False", "true"],
                                                 ["true", "true", "false", "false"])
    assert scored["is_correct"] == [True, False, True, False]
    assert (scored["correct"], scored["invalid"], scored["total"], scored["accuracy"]) == (2, 1, 4, 0.5)


def test_the_prompt_with_and_without_input_and_the_authors_indentation():
    plain = commonsense_tasks.commonsense_prompt({"instruction": "Is it?\nAnswer format: true/false", "input": ""})
    assert plain == ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                     "request.\n\n### Instruction:\nIs it?\nAnswer format: true/false\n\n### Response:\n")
    with_input = commonsense_tasks.commonsense_prompt({"instruction": "Is it?", "input": "Some context."})
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input that provides "
                                 "further context.")
    assert with_input.endswith("### Instruction:\nIs it?\n\n### Input:\nSome context.\n\n### Response:\n")
    authors = commonsense_tasks.commonsense_prompt({"instruction": "Is it?\nAnswer format: true/false", "input": ""},
                                                   commonsense_tasks.AUTHORS_INDENT)
    indent = " " * 12  # utils/data_utils.py's f-string: template lines after the first, not the record's own lines
    assert authors == (plain.split("\n")[0] + f"\n\n{indent}### Instruction:\n{indent}Is it?\nAnswer format: true/false"
                       f"\n\n{indent}### Response:\n{indent}")


def test_the_loss_is_on_the_response_only(tiny_model_dir):
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    prompt = commonsense_tasks.commonsense_prompt({"instruction": "Is it?", "input": ""})
    example = data.tokenize_example(tokenizer, prompt, "the correct answer is true", 512)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "the correct answer is true<|endoftext|>"
    assert example["labels"][:len(tokenizer.encode(prompt))] == [-100] * len(tokenizer.encode(prompt))


def test_a_commonsense_run_writes_every_tasks_accuracy(tmp_path, tiny_model_dir):
    folder = write_commonsense(tmp_path / "cs")
    out = tmp_path / "run"
    argv = [
        "--model", str(tiny_model_dir), "--train_data", "commonsense", "--commonsense_dir", str(folder),
        "--eval_data", ",".join(LABELS), "--out_dir", str(out), "--device", "cpu", "--batch_size", "4",
        "--micro_batch_size", "4", "--max_steps", "2", "--rank", "4", "--lr", "1e-2", "--num_init_samples", "4",
        "--eval_limit", "2", "--commonsense_max_new_tokens", "4", "--schedule", "linear", "--commonsense_prompt",
        "authors"]
    summary = train_gsm8k.main(argv)
    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for task in LABELS:
        assert written[task]["total"] == 2 and 0 <= written[task]["accuracy"] <= 1
        rows = [json.loads(line) for line in (out / f"predictions_{task}.jsonl").read_text().splitlines()]
        assert [r["gold"] for r in rows] == [LABELS[task][0], LABELS[task][1]]
        assert set(rows[0]) == {"index", "question", "gold", "completion", "extracted", "correct"}
    assert written["commonsense_accuracy"] == pytest.approx(sum(written[t]["accuracy"] for t in LABELS) / 3)
    assert written["held_out_loss_on"] == "6 commonsense test answers of boolq, piqa, ARC-Easy"
    config = json.loads((out / "config.json").read_text())
    assert config["eval_data"] == list(LABELS) and config["schedule"] == "linear"
    with pytest.raises(SystemExit, match=r"--schedule: 'linear' -> 'cosine'"):
        train_gsm8k.main([*argv, "--resume", "--schedule", "cosine"])
    (folder / "piqa" / "train.json").write_text((folder / "piqa" / "train.json").read_text().replace("0?", "zero?"))
    with pytest.raises(SystemExit, match=r"training data sha256: .*'piqa/train.json': '\w+'.* -> "):
        train_gsm8k.main([*argv, "--resume"])


def test_commonsense_names_all_eight_tasks_and_an_unknown_task_is_refused(capsys):
    assert train_gsm8k.parse_args(["--eval_data", "commonsense"]).eval_data == tuple(commonsense_tasks.ANSWER_PATTERNS)
    assert train_gsm8k.parse_args(["--eval_data", "gsm8k,boolq,boolq"]).eval_data == ("gsm8k", "boolq")
    with pytest.raises(SystemExit):
        train_gsm8k.parse_args(["--eval_data", "boolq,siqa"])
    assert "argument --eval_data: 'boolq,siqa': choose test sets among" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda records: records[1].pop("answer"), r"boolq/test.json\[1\]: missing string field 'answer'"),
    (lambda records: records[2].update(answer="maybe"), r"boolq/test.json\[2\]: answer 'maybe' is none of boolq's"),
    (None, r"boolq/test.json:1: not valid JSON"),
])
def test_bad_records_are_refused_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, damage, message):
    folder = write_commonsense(tmp_path / "cs")
    path = folder / "boolq" / "test.json"
    if damage:
        records = json.loads(path.read_text())
        damage(records)
        path.write_text(json.dumps(records))
    else:
        path.write_text(path.read_text()[:-3])  # cut short
    monkeypatch.setattr(train_gsm8k.model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=message):
        train_gsm8k.main(["--model", str(tiny_model_dir), "--train_data", "commonsense", "--commonsense_dir",
                          str(folder), "--eval_data", "boolq", "--out_dir", str(tmp_path / "run"), "--device", "cpu"])


def test_a_training_record_without_answer_is_refused_with_its_file_and_index(tmp_path, tiny_model_dir):
    folder = write_commonsense(tmp_path / "cs")
    path = folder / "piqa" / "train.json"
    records = json.loads(path.read_text())
    del records[5]["answer"]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"piqa/train.json\[5\]: missing string field 'answer'"):
        train_gsm8k.main(["--model", str(tiny_model_dir), "--train_data", "commonsense", "--commonsense_dir",
                          str(folder), "--eval_data", "boolq", "--out_dir", str(tmp_path / "run"), "--device", "cpu"])


# ---------------------------------------------------------------------------------------------------------------------
# experiments/commonsense.py --quick on the tiny model

@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_model_dir):
    from experiments import commonsense

    tmp = tmp_path_factory.mktemp("commonsense")
    labels = {task: commonsense_tasks.ANSWER_PATTERNS[task].split("|")[:3] for task in commonsense.TASKS}
    folder = write_commonsense(tmp / "cs", {t: labels[t] for t in commonsense.TASKS}, num_train=2, num_test=4)
    argv = ["--quick", "--model", str(tiny_model_dir), "--commonsense_dir", str(folder), "--out", str(tmp / "out")]
    return commonsense, argv, tmp / "out", commonsense.main(argv)


def test_the_experiment_writes_every_task_and_method_with_intervals(quick):
    commonsense, _, out, results = quick
    written = json.loads((out / "commonsense.json").read_text())
    assert written["parts"] == results["parts"] and written["summary"] == json.loads(json.dumps(results["summary"]))
    summary = written["summary"]
    assert set(summary) == {"base", "lorasb", "loraxs", "lora"}
    b = commonsense.QUICK
    tests = [summary["base"]["test"]] + [t for m in ("lorasb", "loraxs", "lora") for t in summary[m]["seeds"].values()]
    assert all(len(summary[m]["seeds"]) == len(b.seeds) for m in ("lorasb", "loraxs", "lora"))
    for test in tests:
        assert set(test["tasks"]) == set(commonsense.TASKS)
        for cell in (*test["tasks"].values(), test["mean"]):
            low, high = cell["interval"]
            assert 0 <= low <= cell["accuracy"] <= high <= 1 and cell["correct"] <= cell["total"]
        assert test["mean"]["total"] == b.test_per_task * len(commonsense.TASKS)
    for method, grid in b.lr_grid:
        assert summary[method]["lr"] in grid and len(summary[method]["validation_losses"]) == len(grid)
        spread = summary[method]["across_seeds"]
        assert set(spread) == {*commonsense.TASKS, "mean"} and all(s["std"] >= 0 for s in spread.values())
    assert (out / "commonsense_accuracy.svg").read_text().startswith("<svg")


def test_the_chosen_run_is_evaluated_from_its_grid_weights_at_the_first_seed_only(quick):
    commonsense, _, out, results = quick
    parts, (first, second) = results["parts"], commonsense.QUICK.seeds
    for method, _ in commonsense.QUICK.lr_grid:
        lr = results["summary"][method]["lr"]
        grid, evaluated = parts[f"grid/{method}-lr{lr:g}"], parts[f"eval/{method}-seed{first}"]
        assert evaluated["trained_weights"] == f"{method}-lr{lr:g}-seed{first}.safetensors"
        assert evaluated["validation_loss"] == grid["validation_loss"]  # the very weights the grid run trained
        assert "trained_weights" not in parts[f"eval/{method}-seed{second}"]  # a further seed trains anew


def test_a_rerun_reuses_parts_with_the_same_settings_only(quick, monkeypatch, capsys):
    commonsense, argv, out, results = quick
    monkeypatch.setattr(commonsense, "train_and_measure", lambda *a, **k: pytest.fail("a finished part was rerun"))
    assert commonsense.main(argv)["parts"] == results["parts"]
    assert "eval/base: reused (same settings)" in capsys.readouterr().out
    monkeypatch.setattr(commonsense, "QUICK", commonsense.dataclasses.replace(commonsense.QUICK, test_per_task=3))
    monkeypatch.setattr(commonsense, "base_model_part", lambda exp: {"test": results["summary"]["base"]["test"]})
    with pytest.raises(pytest.fail.Exception, match="a finished part was rerun"):
        commonsense.main(argv)  # the budget changed: the grid runs are recomputed
    assert "settings changed, recomputed" in capsys.readouterr().out
    monkeypatch.undo()
    folder = Path(argv[argv.index("--commonsense_dir") + 1])
    other_data = shutil.copytree(folder, folder.parent / "other_cs")
    (other_data / "piqa" / "test.json").write_text((other_data / "piqa" / "test.json").read_text().replace("0?", "?"))
    for part in ("train_and_measure", "base_model_part"):
        monkeypatch.setattr(commonsense, part, lambda *a, **k: pytest.fail("a part of other data was computed"))
    with pytest.raises(pytest.fail.Exception, match="a part of other data was computed"):  # not reused
        commonsense.main([*argv, "--commonsense_dir", str(other_data)])

"""The experiments' commands as the READMEs' section headings show them: each parses as written, writes outside the
committed results (where a rerun would be refused, or replace them), and a refused study leaves nothing behind."""

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from experiments import commonsense, study

COMMITTED = REPO / "experiments" / "results"


def heading_commands() -> list[list[str]]:
    """The `python experiments/X.py ...` commands in the headings of README.md and the documents it links (the full
results are in experiments/README.md), as argument lists."""
    documents = [REPO / "README.md", REPO / "experiments" / "README.md", REPO / "machinery" / "README.md"]
    found = [command for document in documents
             for command in re.findall(r"^#+ .*`python (experiments/\w+\.py[^`]*)`", document.read_text(), re.M)]
    return [shlex.split(command) for command in found]


@pytest.mark.parametrize("module", [study, commonsense], ids=["study", "commonsense"])
def test_a_heading_s_command_parses_and_writes_outside_the_committed_results(module):
    commands = [argv for argv in heading_commands() if argv[0] == f"experiments/{module.__name__.split('.')[-1]}.py"]
    assert commands, "no README has a heading with this experiment's command"
    for argv in commands:
        args = module.parse_args(argv[1:])  # argparse exits (status 2) on a missing required option
        assert not Path(args.out).resolve().is_relative_to(COMMITTED.resolve()), args.out


def test_a_refused_study_leaves_nothing_behind(tmp_path, tiny_model_dir, tiny_gsm8k_dir):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"settings": {"seed": 0}, "parts": {}}))  # made before fingerprints
    with pytest.raises(SystemExit, match="records no fingerprint"):
        study.main(["--quick", "--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir), "--out", str(out),
                    "--device", "cpu"])
    assert [p.name for p in out.iterdir()] == ["study.json"]

"""experiments/ab_lorasb.py: two versions of lorasb.py timed in one process (the figures mean nothing at this size)."""

import shutil

from conftest import REPO
from experiments import ab_lorasb


def test_times_both_versions_on_a_tiny_config_and_prints_the_ratio(tmp_path, capsys):
    old = tmp_path / "lorasb_old.py"
    shutil.copy(REPO / "lorasb.py", old)
    ab_lorasb.main(["--old", str(old), "--config", "tiny", "--rounds", "1", "--rank", "4", "--samples", "2",
                    "--seq", "16"])
    out = capsys.readouterr().out
    assert "estimate: old" in out and "training step: old" in out and "new / old" in out

"""benchmarks/reproducibility.py: two runs of one evaluation compared from their reports' records."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from test_hw_benchmarks import BENCHMARKS, load

from cllm.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "evaluate"  # 3 timed prompts; jacobi 0.763x [0.747, 0.900] AR
reproducibility = load(BENCHMARKS / "reproducibility.py")


def slower(folder: Path, factor: float) -> None:
    """Make the first prompt's jacobi record take `factor` times as long (its ratio to AR divides by it)."""
    path = folder / "records" / "cllm" / "set" / "jacobi_n4_float64.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["choices"][0]["wall_time"] = [t * factor for t in lines[0]["choices"][0]["wall_time"]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_report_against_itself_and_against_one_prompt_twice_as_slow(tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)
    out = tmp_path / "repro.json"
    reproducibility.main(["--reports", str(FIXTURE), str(FIXTURE), "--decoder", "jacobi", "--output", str(out)])
    same = json.loads(out.read_text())
    assert same["median_gap"] == 0 and same["per_prompt_change"] == {"median": 0, "max": 0}
    assert same["per_prompt_correlation"] == pytest.approx(1.0)
    first = same["runs"][0]
    assert first["median_from_records"] == pytest.approx(0.7628588458924926, rel=1e-9)  # the report's own median
    half = (0.9001432294391605 - 0.7466420347594817) / 2 / 0.7628588458924926  # 10.06%
    assert first["half_width"] == pytest.approx(half) and first["prompts_for_10pct"] == math.ceil(3 * (half / 0.1) ** 2)
    slower(other, 2.0)
    reproducibility.main(["--reports", str(FIXTURE), str(other), "--decoder", "jacobi", "--output", str(out)])
    moved = json.loads(out.read_text())["per_prompt_change"]
    assert moved == {"median": 0, "max": pytest.approx(1.0)}  # |r / (r / 2) - 1| = 1 on that prompt, 0 elsewhere
    assert "a 10% half-width needs ~" in capsys.readouterr().out


def test_a_missing_decoder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no decoder 'bogus' for model 'cllm' on prompt set 'set'"):
        reproducibility.main(["--reports", str(FIXTURE), str(FIXTURE), "--decoder", "bogus"])

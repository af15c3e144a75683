"""The objective-ablation script end to end on the tiny model: three variants trained, exported, evaluated, reported."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "forcing_ablation.py"


@pytest.mark.slow
def test_ablation_trains_every_variant_and_reports_curves_and_test_split(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("forcing_ablation", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "report"
    argv = ["forcing_ablation.py", "--config", "tiny.yaml", "--base", "tiny", "--domain", "code"]
    argv += ["--data", str(tmp_path / "data"), "--steps", "2", "--val-every", "2", "--test-limit", "2"]
    argv += ["--max-new-tokens", "8", "--output", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    results = json.loads((output / "results.json").read_text())
    assert set(results["variants"]) == {"cllm", "pack4", "jacobi_forcing"}
    for entry in results["variants"].values():
        assert [step for step, _ in entry["curves"]["val/accepted_tokens_per_step"]] == [0, 2]
        assert entry["seconds_per_step"] > 0
    assert set(results["test"]) == {"base", "cllm", "pack4", "jacobi_forcing"}
    text = (output / "results.md").read_text()
    assert "JF / pack4" in text and "| jacobi_forcing |" in text
    monkeypatch.setattr(sys, "argv", ["forcing_ablation.py", "--report-only", "--output", str(output)])
    script.main()
    assert (output / "results.md").read_text() == text

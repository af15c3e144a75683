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


def fake_results() -> dict:
    curve = {"cllm": [1.1, 1.15, 1.2], "pack4": [1.1, 1.2, 1.3], "jacobi_forcing": [1.1, 1.25, 1.45]}
    variants = {
        name: {
            "curves": {
                "val/accepted_tokens_per_step": [[s, v] for s, v in zip((0, 20, 40), values)],
                "val/base_agreement": [[0, 1.0], [20, 0.6], [40, 0.5]],
                "val/degenerate_rate": [[0, 0.0], [20, 0.0], [40, 0.0]],
            },
            "seconds_per_step": 20.0,
        }
        for name, values in curve.items()
    }
    entry = {"num_prompts": 2, "accepted_tokens_per_step": 1.1, "quality": {"exact": 0.5}, "degenerate_rate": 0.0}
    test = {name: dict(entry) for name in ["base", *curve]}
    test["jacobi_forcing"]["accepted_tokens_per_step"] = 1.4
    results = {"domain": "json", "command": "c", "machine": "m", "cpu_flags": "avx2", "data": "d", "steps": 40}
    results |= {"batch_size": 4, "val_every": 20, "test_set": "json-extract:test", "max_new_tokens": 64}
    results |= {"variants": variants, "test": test}
    return results


def test_gains_and_the_tables_between_the_headline_markers(tmp_path):
    spec = importlib.util.spec_from_file_location("forcing_ablation", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = fake_results()
    results["gains"] = script.gains(results)
    assert dict(results["gains"]["jacobi_forcing"]["validation"])[40] == pytest.approx(0.35)
    assert results["gains"]["jacobi_forcing"]["test"] == pytest.approx(0.3)
    text = script.markdown(results)
    assert "| 40 | +0.200 | +0.350 | 1.75x |" in text
    headline = tmp_path / "headline.md"
    json_begin, json_end = script.markers("json")
    headline.write_text(f"before\n{json_begin}\nold\n{json_end}\nafter\n")
    script.insert_tables(headline, text, tmp_path / "results", "json")
    inserted = headline.read_text()
    assert inserted.startswith("before\n") and inserted.endswith("after\n") and "old" not in inserted
    assert "| jacobi_forcing | 1.400 | +0.300 |" in inserted
    code = tmp_path / "both.md"  # each domain has its own markers, so both ablations fit in one file
    begin, end = script.markers("code")
    code.write_text(f"{json_begin}\njson\n{json_end}\n{begin}\nold\n{end}\n")
    script.insert_tables(code, text.replace("on json", "on code"), tmp_path / "results", "code")
    assert "json" in code.read_text().split(begin)[0] and "old" not in code.read_text()
    with pytest.raises(SystemExit, match="forcing-ablation-code:begin"):
        script.insert_tables(headline, text, tmp_path / "results", "code")

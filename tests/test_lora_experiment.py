"""benchmarks/lora_experiment.py's test-split stage, with `cllm evaluate` replaced by a stub that writes its report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from test_hw_benchmarks import BENCHMARKS, load

lora_experiment = load(BENCHMARKS / "lora_experiment.py")


def test_the_base_is_evaluated_into_a_folder_no_fit_made(tmp_path, monkeypatch):
    jacobi = {"tokens_per_step": 1.25, "degenerate_rate": 0.0, "quality": {"valid": 0.5, "exact": 0.25, "fields": 0.5}}
    calls = []

    def evaluate(command, stdout, stderr):
        calls.append(command)
        out = Path(command[command.index("--output") + 1])
        out.mkdir(parents=True)
        report = {"models": {"cllm": {"json-extract": {"decoders": {"jacobi": jacobi}}}}}
        (out / "results.json").write_text(json.dumps(report))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(lora_experiment.subprocess, "run", evaluate)
    settings = lora_experiment.LoraExperimentSettings(data="unused")
    out = tmp_path / "work" / "base" / "test-eval"  # neither work/ nor base/ exists yet
    figures = lora_experiment.test_figures(settings, "smollm2-135m", out)
    assert figures == {
        "tokens_per_step": 1.25,
        "degenerate_rate": 0.0,
        "valid": 0.5,
        "exact": 0.25,
        "fields": 0.5,
        "report": str(out),
    }
    assert (out.parent / "test-eval.log").is_file()
    assert calls[0][calls[0].index("--model") + 1] == "smollm2-135m"
    assert lora_experiment.test_figures(settings, "smollm2-135m", out) == figures and len(calls) == 1  # reused

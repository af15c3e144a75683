"""The hardware benchmarks run on CPU at tiny shapes: gpu_check's refusal and dry run, train_step, fsdp_memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / name), *args]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    done = script("gpu_check.py", "--output", str(tmp_path / "out.json"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check needs a CUDA device and torch.cuda.is_available() is False here"
    ]
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_runs_every_cpu_section(tmp_path):
    done = script("gpu_check.py", "--dry-run-cpu", "--output", str(tmp_path / "out.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["dry_run_cpu"] and report["machine"]["auto_dtype"] in {"bfloat16", "float32"}
    sections = report["sections"]
    assert set(sections) == {"pass_cost", "train_step_tiny", "jacobi_eager", "forcing_flex", "lora_step_tiny"}
    assert all(section["ok"] for section in sections.values()), sections
    assert sections["train_step_tiny"]["tokens_per_s"] > 0 and sections["train_step_tiny"]["flops"] > 0
    assert sections["jacobi_eager"]["accepted_tokens_per_step"] >= 1.0
    assert sections["forcing_flex"]["length"] == 8 + 4 * 2 * 4 and sections["forcing_flex"]["max_abs_logit_gap"] < 1e-4


@pytest.mark.slow
def test_train_step_compares_four_variants_at_a_tiny_shape(tmp_path):
    out = tmp_path / "train_step.json"
    done = script("train_step.py", "--model", "tiny", "--n", "4", "--repeats", "1", "--output", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {(r["logits"], r["compute"]) for r in result["rows"]} == {
        (logits, compute) for logits in ("full", "sliced") for compute in ("float32", "bf16 autocast")
    }
    assert "cpu_flags" in result["machine"] and result["auto"]["dtype"]
    float32 = [r["loss"] for r in result["rows"] if r["compute"] == "float32"]
    assert float32[0] == pytest.approx(float32[1], rel=1e-5)  # the same first-step loss, sliced or not

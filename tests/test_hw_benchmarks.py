"""The benchmarks parse like every `cllm` command, and the hardware ones run on CPU at tiny shapes: gpu_check's
refusal and dry run, pass_cost, train_step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cllm.errors import UserError
from cllm.hardware import cpu_flags

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / name), *args]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def load(path: Path):
    """A benchmark script as a module (registered, so that its settings dataclass resolves its type hints)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda path: path.name)
def test_every_benchmark_parses_like_a_cllm_command(path, capsys):
    main = load(path).main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "--config CONFIG" in capsys.readouterr().out  # jsonargparse's, with --print_config
    with pytest.raises(UserError, match="unrecognized arguments: --bogus"):
        main(["--bogus", "1"])


def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    done = script("gpu_check.py", "--output", str(tmp_path / "out.json"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"{BENCHMARKS / 'gpu_check.py'}: error: needs a CUDA device and torch.cuda.is_available() is False here "
        "(--dry_run_cpu: on the CPU)"
    ]
    assert not (tmp_path / "out.json").exists()


def test_pass_cost_times_a_tiny_model_per_block_and_dtype(tmp_path):
    pass_cost = load(BENCHMARKS / "pass_cost.py")
    with pytest.raises(UserError, match="--repeats: expected int, got 'many'"):
        pass_cost.main(["--repeats", "many"])
    with pytest.raises(UserError, match="--blocks must be >= 1 and hold 1"):
        pass_cost.main(["--blocks", "2", "4"])
    out = tmp_path / "pass_cost.json"
    tiny = ["--shape", "tiny", "--dtypes", "float32", "--blocks", "1", "4", "--context", "8", "--repeats", "1"]
    pass_cost.main([*tiny, "--output", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(row["dtype"], row["block"]) for row in rows] == [("float32", 1), ("float32", 4)]
    assert rows[0]["x_one_token"] == 1.0 and rows[1]["ms"] > 0


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
    flex = sections["forcing_flex"]
    assert flex["length"] == 8 + 4 * 2 * 4 and flex["agrees_with_sdpa"] == (flex["max_abs_logit_gap"] < 1e-4)
    # On AVX-512 CPUs the compiled FlexAttention equals sdpa; on an AVX2-only one (torch 2.13) its grouped-query
    # kernel gave NaN logits: the report must say so, not hide it (and cllm never picks flex_attention on a CPU).
    if "avx512f" in cpu_flags():
        assert flex["agrees_with_sdpa"], flex


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


def test_block_profile_credits_each_pass_to_the_stretch_of_its_first_token(tmp_path):
    block_profile = load(BENCHMARKS / "block_profile.py")
    answers = [[1, 1, 14, 16], [16, 2, 2]]  # prompt 1: passes start at 0, 1, 2, 16; prompt 2: at 0, 16, 18
    lines = [json.dumps({"choices": [{"accept_lengths": lengths}]}) for lengths in answers]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    rows = block_profile.profile(tmp_path / "r.jsonl", stretch=16, stretches=4)
    assert rows == {0: (2.0, (1 + 1 + 14 + 16) / 4), 1: (1.5, (16 + 2 + 2) / 3)}

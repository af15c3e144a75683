"""`cllm ablate`: run planning, the collector on real CSVLogger output, and a real two-run sweep on a stub model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel

from cllm import ablate, ablate_collect
from cllm.errors import UserError

HERE = Path(__file__).parent


class AcceptingBoringModel(BoringModel):
    """Logs a fixed accepted-tokens value, so each overlay's row in the table is known in advance."""

    def __init__(self, accepted: float = 1.0) -> None:
        super().__init__()
        self.accepted = accepted

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"])
        return out

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val/accepted_tokens_per_step", torch.tensor(self.accepted))
        return out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_plan_and_delta(tmp_path: Path) -> None:
    b = _write(tmp_path / "ov" / "b_n8.yaml", "model: {init_args: {n: 8}}\n")
    a = _write(tmp_path / "ov" / "a_no_ar.yaml", "model:\n  init_args: {ar_weight: 0}\ntrainer: {logger: false}\n")
    files = ablate.overlay_files([str(tmp_path / "ov")])
    assert files == [a, b]
    assert ablate.plan_runs(files, baseline=True) == [("baseline", None), ("a_no_ar", a), ("b_n8", b)]
    assert ablate.overlay_delta(a) == "model.ar_weight=0"
    assert ablate.overlay_delta(None) == "(base config)"
    with pytest.raises(UserError, match="unique"):
        ablate.overlay_files([str(a), str(a)])
    with pytest.raises(UserError, match="neither"):
        ablate.overlay_files([str(tmp_path / "missing.yaml")])


def test_fit_args_point_every_logger_at_the_run_folder(tmp_path: Path) -> None:
    base = _write(
        tmp_path / "base.yaml",
        "trainer:\n  logger:\n"
        "    - {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs/x, name: logs}}\n"
        "    - {class_path: cllm.tracking.WandbLogger, init_args: {project: p}}\n",
    )
    overlay = _write(tmp_path / "n8.yaml", "model: {init_args: {n: 8}}\n")
    root = tmp_path / "root"
    args = ablate.fit_args(str(base), "n8", overlay, root, ["--trainer.max_steps=2"])
    logger_config = root / "n8" / ablate.LOGGERS
    assert args == [
        *("--config", str(base), "--config", str(overlay), "--config", str(logger_config)),
        f"--trainer.default_root_dir={root / 'n8'}",
        "--trainer.max_steps=2",
    ]
    ablate.write_logger_config(str(base), "n8", overlay, root)
    loggers = yaml.safe_load(logger_config.read_text())["trainer"]["logger"]
    assert loggers == [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(root / "n8"), "name": "logs"},
        },
        {
            "class_path": "cllm.tracking.WandbLogger",
            "init_args": {"project": "p", "save_dir": str(root / "n8"), "name": "n8", "group": "root", "tags": ["n8"]},
        },
    ]
    no_logger = _write(tmp_path / "nolog.yaml", "trainer: {logger: false}\n")
    assert ablate.fit_args(str(no_logger), "x", None, root, []) == [
        "--config",
        str(no_logger),
        f"--trainer.default_root_dir={root / 'x'}",
    ]


def test_collect_reads_csv_history_and_keeps_prose(tmp_path: Path) -> None:
    run = tmp_path / "root" / "baseline" / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/accepted_tokens_per_step"])
        writer.writerows([[0, 0, "", 1.1], [0, 4, 2.5, ""], [0, 9, 1.25, 2.0]])
    # A run that failed before logging anything still gets its row.
    _write(tmp_path / "root" / "n32" / ablate_collect.RECORD, '{"delta": "data.n=32", "returncode": 1}')
    columns, rows = ablate_collect.collect(tmp_path / "root")
    assert columns[:4] == ["run", "change", "status", "step"]
    assert rows[1] == {"run": "n32", "change": "data.n=32", "status": "failed"}
    assert rows[:1] == [
        {
            "run": "baseline",
            "change": "",
            "status": "ok",
            "epoch": 0.0,
            "step": 9.0,
            "train/loss": 1.25,
            "val/accepted_tokens_per_step": 2.0,
            "base/accepted_tokens_per_step": 1.1,
        }
    ]
    begin, end = ablate_collect.BEGIN, ablate_collect.END
    output = _write(tmp_path / "docs" / "ablations.md", f"# Ablations\n\nprose\n\n{begin}\nold\n{end}\ntail\n")
    rows = rows[:1]
    table = ablate_collect.render_markdown(columns, rows, tmp_path)
    ablate_collect.write_report(output, table, ablate_collect.render_csv(columns, rows))
    text = output.read_text()
    assert "prose" in text and "tail" in text and "old" not in text
    assert "| baseline |  | ok | 9 | 1.1 | 2 | 1.25 |" in text
    assert output.with_suffix(".csv").read_text().splitlines()[1].startswith("baseline,,ok,9.0,1.1,2.0,1.25")
    with pytest.raises(UserError, match="no run folder"):
        ablate_collect.collect(_write(tmp_path / "empty" / "x" / "note.txt", "").parent.parent)


def test_index_count_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = _write(tmp_path / "base.yaml", "trainer: {max_steps: 1}\n")
    _write(tmp_path / "ov" / "x.yaml", "trainer: {max_steps: 2}\n")
    common = ["--base", str(base), "--overlays", str(tmp_path / "ov"), "--root", str(tmp_path / "r")]
    ablate.main([*common, "--count"])
    assert capsys.readouterr().out.strip() == "2"
    ablate.main([*common, "--dry-run", "--trainer.max_epochs=1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].endswith(
        f"--trainer.default_root_dir={tmp_path / 'r' / 'x'} --trainer.max_epochs=1"
    )
    with pytest.raises(UserError, match="out of range"):
        ablate.main([*common, "--index", "2"])


def _stub_base(folder: Path) -> Path:
    return _write(
        folder / "base.yaml",
        "model: {class_path: test_ablate.AcceptingBoringModel}\n"
        "data: {class_path: lightning.pytorch.demos.boring_classes.BoringDataModule}\n"
        "trainer: {max_epochs: 1, limit_train_batches: 2, limit_val_batches: 1, log_every_n_steps: 1,\n"
        "  accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false,\n"
        "  enable_checkpointing: false}\n",
    )


def test_index_runs_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What each task of scripts/slurm/ablate.sbatch does; in-process so SIGUSR1 reaches the trainer.
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI rewrites sys.argv for LightningCLI
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    _write(tmp_path / "ov" / "more.yaml", "model: {init_args: {accepted: 3.0}}\n")
    root = tmp_path / "runs"
    common = ["--base", str(_stub_base(tmp_path)), "--overlays", str(tmp_path / "ov"), "--root", str(root)]
    ablate.main([*common, "--index", "1"])
    assert [p.name for p in root.iterdir()] == ["more"]
    record = json.loads((root / "more" / ablate_collect.RECORD).read_text())
    assert record["returncode"] == 0 and record["delta"] == "model.accepted=3.0"
    assert ablate_collect.final_metrics(root / "more")["val/accepted_tokens_per_step"] == 3.0


@pytest.mark.slow
def test_real_sweep_then_collect(tmp_path: Path) -> None:
    base = _stub_base(tmp_path)
    _write(tmp_path / "ov" / "more.yaml", "model: {init_args: {accepted: 2.5}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    root, output = tmp_path / "runs", tmp_path / "ablations.md"
    cllm = [sys.executable, "-m", "cllm", "ablate"]
    run = [*cllm, "--base", str(base), "--overlays", str(tmp_path / "ov"), "--root", str(root)]
    proc = subprocess.run(run, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["baseline", "more"]
    proc = subprocess.run(
        [*cllm, "--collect", str(root), "--output", str(output)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["run"]: row for row in csv.DictReader(output.with_suffix(".csv").open())}
    assert float(rows["baseline"]["val/accepted_tokens_per_step"]) == 1.0
    assert float(rows["more"]["val/accepted_tokens_per_step"]) == 2.5
    assert rows["more"]["change"] == "model.accepted=2.5" and rows["more"]["status"] == "ok"
    # Lightning logs the 2 steps of this run as steps 0 and 1.
    assert float(rows["more"]["step"]) == 1 and "train/loss" in rows["more"]

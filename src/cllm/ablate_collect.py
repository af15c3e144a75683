"""`cllm ablate --collect ROOT`: the final metrics of every run folder under ROOT as one markdown + CSV table."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cllm.errors import UserError
from cllm.files import atomic_write_text
from cllm.tracking import read_metrics_csv, read_offline_run

BASELINE = "baseline"
RECORD = "ablate.json"  # per run: command, return code, seconds, overlay delta
# Shown first, in this order, when present; then any other val/* metric, then train losses.
PREFERRED = (
    "val/accepted_tokens_per_step",
    "val/base_agreement",
    "val/degenerate_rate",
    "val/loss",
    "val/consistency_loss",
    "val/ar_loss",
    "train/loss",
)
# Throughput is left out: on a shared machine it measures the neighbours (bench it with `cllm bench`).
SKIPPED = (
    "train/lr",
    "train/tokens_per_s",
    "train/seconds_per_step",
    "train/samples_per_s",
    "train/mfu",
    "train/grad_norm",
    "val/jacobi_tokens_per_s",
    "epoch",
    "step",
)
BEGIN, END = "<!-- ablate:begin -->", "<!-- ablate:end -->"


def wandb_history(run_dir: Path) -> list[dict[str, float]]:
    """History rows of the W&B runs under `run_dir/wandb` (a requeued job has one folder per attempt)."""
    rows = []
    for folder in sorted(run_dir.glob("wandb/*run-*")):
        if folder.is_dir() and list(folder.glob("run-*.wandb")):
            for row in read_offline_run(folder).history:
                scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("_")}
                if "trainer/global_step" in scalars:
                    scalars["step"] = scalars.pop("trainer/global_step")
                rows.append(scalars)
    return rows


def final_metrics(run_dir: Path) -> dict[str, float]:
    """Last logged value of every metric, plus `step` (the last step logged) and the step-0 accepted tokens."""
    rows = read_metrics_csv(run_dir) or wandb_history(run_dir)
    final: dict[str, float] = {}
    for row in rows:
        final.update(row)
    accepted = [row for row in rows if "val/accepted_tokens_per_step" in row]
    if accepted and accepted[0].get("step", 0) == 0:
        final["base/accepted_tokens_per_step"] = accepted[0]["val/accepted_tokens_per_step"]
    return final


def collect(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per run folder under `root` (baseline first): name, overlay delta, final step and metrics."""
    if not root.is_dir():
        raise UserError(f"--collect {root}: no such folder")
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (p.name != BASELINE, p.name))
    rows, keys = [], set()
    for folder in folders:
        record = json.loads((folder / RECORD).read_text()) if (folder / RECORD).is_file() else {}
        metrics = final_metrics(folder)
        if not metrics and not record:
            continue  # not a run folder
        keys |= set(metrics)
        status = "failed" if record.get("returncode") else ("ok" if metrics else "no metrics")
        rows.append({"run": folder.name, "change": record.get("delta", ""), "status": status, **metrics})
    if not keys:
        raise UserError(f"--collect {root}: no run folder with a metrics.csv or W&B run files")
    ordered = [k for k in ("base/accepted_tokens_per_step", *PREFERRED) if k in keys]
    ordered += sorted(k for k in keys if k.startswith("val/") and k not in ordered and k not in SKIPPED)
    ordered += sorted(k for k in keys if k.startswith("train/") and "loss" in k and k not in ordered)
    columns = ["run", "change", "status", "step", *ordered]
    return columns, rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def render_markdown(columns: list[str], rows: list[dict[str, Any]], root: Path) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Collected from `{root}` by `python -m cllm ablate --collect {root}` on {stamp}. Final value of each metric;",
        "`base/accepted_tokens_per_step` is the model before training (step 0). Accepted tokens per step = generated",
        "tokens / decode forward passes (prefill excluded), averaged over prompts; greedy AR is exactly 1.0.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c in ("run", "change", "status") else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_report(output: Path, table: str, csv_text: str) -> None:
    """Write the table into `output` between the ablate markers (prose around them is kept), and the CSV beside it."""
    block = f"{BEGIN}\n{table}{END}"
    if output.is_file() and BEGIN in (text := output.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"# Ablations\n\n{block}\n"
    atomic_write_text(output, text)
    atomic_write_text(output.with_suffix(".csv"), csv_text)

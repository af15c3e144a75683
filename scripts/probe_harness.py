"""The reliability probe's harness: the case registry, running and judging a `cllm` command, shared inputs, the table.

Case modules register their cases with `@case(item, name)`; `CASES` keeps them in registration order, which is the
table's row order (see `reliability_probe.py`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ERROR = "error"  # expect: exit 2, one `cllm ...: error:` line, no traceback
OK = "ok"  # expect: exit 0
TINY_FIT = ["fit", "--config", "tiny.yaml", "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]


@dataclass
class Outcome:
    command: str
    code: int
    seen: str  # the line the user reads (last line of stderr, or of stdout on success)
    ok: bool
    note: str = ""


@dataclass
class Case:
    item: str  # the item of issue #15 (or "-" for a case the first probe passed)
    name: str
    run: Callable[[Path], Outcome]


CASES: list[Case] = []


def case(item: str, name: str):
    def register(function: Callable[[Path], Outcome]) -> Callable[[Path], Outcome]:
        CASES.append(Case(item, name, function))
        return function

    return register


# -- running a command --------------------------------------------------------------------------------------------


def cli(work: Path, args: list[str], expect: str = ERROR, contains: str = "", timeout: int = 300, **popen) -> Outcome:
    """Run `python -m cllm ARGS` in `work`; judge it against `expect` (and a phrase the message must hold)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "CI": ""}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cllm", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **popen,
        )
    except subprocess.TimeoutExpired:
        return Outcome(shown(work, args), -1, f"(no answer within {timeout} s)", False)
    seconds = time.perf_counter() - start
    return judge(work, args, done.returncode, done.stdout, done.stderr, expect, contains, seconds)


def judge(work, args, code, stdout, stderr, expect, contains, seconds) -> Outcome:
    err_lines = [line for line in stderr.splitlines() if line.strip()]
    out_lines = [line for line in stdout.splitlines() if line.strip()]
    traceback = any(line.startswith("Traceback") for line in err_lines)
    if expect == ERROR:
        last = err_lines[-1] if err_lines else ""
        errors = [line for line in err_lines if ": error: " in line]
        ok = code == 2 and not traceback and len(errors) == 1 and last.startswith("cllm ") and contains in last
        seen = last if not traceback else f"traceback ({len(err_lines)} lines) ending: {last}"
    else:
        ok = code == 0 and contains in stdout + stderr
        seen = out_lines[-1] if out_lines else (err_lines[-1] if err_lines else "")
    note = f"{seconds:.0f} s"
    return Outcome(shown(work, args), code, clean(seen, work), ok, note)


def shown(work: Path, args: list[str]) -> str:
    return clean("cllm " + " ".join(args), work)


def clean(text: str, work: Path) -> str:
    text = text.replace(str(work), "WORK").replace(str(ROOT), "REPO")
    return text if len(text) <= 220 else text[:217] + "..."


# -- shared inputs ------------------------------------------------------------------------------------------------

CACHE: dict[str, Path] = {}


def base() -> Path:
    if "base" not in CACHE:
        CACHE["base"] = Path(tempfile.mkdtemp(prefix="cllm-probe-base-"))
    return CACHE["base"]


def dataset(work: Path, name: str = "data") -> Path:
    """A tiny trajectory dataset (collected once per probe, copied into `work/name`)."""
    source = base() / "data"
    if not source.exists():
        result = cli(base(), TINY_COLLECT + ["--output", "data"], expect=OK)
        assert result.ok, result
    shutil.copytree(source, work / name)
    return work / name


TINY_COLLECT = [
    "trajectories", "--model", "tiny", "--prompts", "stdlib-code:train", "--limit", "4", "--n", "4",
    "--max_new_tokens", "16", "--chat_template", "false", "--shard_size", "2",
]  # fmt: skip


def tiny_fit_data(work: Path) -> Path:
    """The dataset where tiny.yaml looks for it, so `fit --config tiny.yaml` skips collecting."""
    (work / "data").mkdir(exist_ok=True)
    return dataset(work, "data/tiny-trajectories")


def checkpoint_file(work: Path) -> Path:
    """A tiny one-step fit's .ckpt (made once, copied)."""
    source = base() / "fit"
    if not source.exists():
        source.mkdir()
        tiny_fit_data(source)
        result = cli(source, TINY_FIT, expect=OK)
        assert sorted(source.rglob("*.ckpt")), result
    shutil.copy(sorted(source.rglob("*.ckpt"))[-1], work / "model.ckpt")
    return work / "model.ckpt"


class Payload:
    """Unpickling it writes a marker file (a real attack would call os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def sharded_checkpoint(folder: Path, planted: Path | None = None, where: str = "index") -> Path:
    """A DCP folder like ModelParallelStrategy's (model + optimizer state + meta.pt), a payload planted if asked."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from cllm.models import build_tiny

    model, _ = build_tiny()
    state = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}
    lr = Payload(planted) if planted and where == "value" else 1e-3
    state["optimizer_0"] = {"param_groups": [{"lr": lr}]}
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save({"hyper_parameters": {"model": "tiny", "dtype": "float32"}, "global_step": 1}, folder / "meta.pt")
    if planted and where == "index":
        metadata = FileSystemReader(folder).read_metadata()
        metadata.planner_data = {"state_dict": Payload(planted)}
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder


def with_marker(outcome: Outcome, marker: Path) -> Outcome:
    if marker.exists():
        outcome.ok, outcome.note = False, "the payload RAN (marker written)"
    else:
        outcome.note = "payload did not run; " + outcome.note
    return outcome


def write_prompts(path: Path, prompts: list[str], ids: list[str] | None = None) -> Path:
    rows = [{"prompt": p} | ({"id": ids[i]} if ids else {}) for i, p in enumerate(prompts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_fit(work: Path, *extra: str) -> list[str]:
    return [*TINY_FIT, "--data.init_args.path=data", "--data.init_args.max_new_tokens=16", *extra]


# -- the report ---------------------------------------------------------------------------------------------------


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags unknown"
    flags = sorted({flag for flag in ("avx2", "avx512_bf16", "amx_bf16") if f" {flag}" in text})
    return f"{os.cpu_count()} CPUs, flags {' '.join(flags) or 'none of avx2/avx512_bf16/amx_bf16'}"


def markdown(rows: list[dict], command: str) -> str:
    passed = sum(row["ok"] for row in rows)
    lines = [
        "# Reliability probe",
        "",
        f"Regenerate with `{command}` (tiny models, CPU, offline; a few minutes). Each case runs the command a",
        "user would in a fresh folder and checks what the user sees: bad input ends with exit code 2 and one",
        "`cllm CMD: error: ...` line (no traceback); security cases also check that the planted payload or escape",
        "left no trace (marker file, connection to a local listener, surviving process). `item` is the item of",
        "issue #15 the case comes from (`-`: a case the first probe already passed). Paths: `WORK` is the case's",
        "folder.",
        "",
        f"**{passed} of {len(rows)} cases as expected.** Machine: {cpu_flags()}; timings are wall seconds per case.",
        "",
        "| item | case | command | exit | what the user sees | status |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        status = "ok" if row["ok"] else "**FAIL**"
        note = f" ({row['note']})" if row["note"] else ""
        seen = row["seen"].replace("|", "\\|")
        command_cell = row["command"].replace("|", "\\|")
        lines.append(f"| {row['item']} | {row['name']} | `{command_cell}` | {row['code']} | {seen}{note} | {status} |")
    return "\n".join(lines) + "\n"

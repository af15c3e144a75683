"""Reliability probe: fault, bad-input and security cases on tiny models, tried as a user would; writes the table.

    python scripts/reliability_probe.py                     # every case -> docs/reliability.md + results JSON
    python scripts/reliability_probe.py --only export,sandbox  # cases whose name contains a word

Each case prepares files in a fresh folder, runs the command a user would (`python -m cllm ...` in a subprocess,
offline), and checks what the user sees: exit code 2 with one `cllm CMD: error: ...` line and no traceback for bad
input, exit 0 where the run must succeed, and for the security cases that the planted payload or escape left no
trace (marker file, connection, surviving process). The next probe starts from this list: add a case here.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
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


# -- security -----------------------------------------------------------------------------------------------------


@case("1", "export: payload planted in a sharded checkpoint's .metadata")
def _(work):
    marker = work / "marker"
    sharded_checkpoint(work / "ck", marker)
    return with_marker(cli(work, ["export", "--ckpt", "ck", "--output", "out"], contains="refused"), marker)


@case("1", "export: payload planted in a sharded checkpoint's optimizer value")
def _(work):
    marker = work / "marker"
    sharded_checkpoint(work / "ck", marker, where="value")
    return with_marker(cli(work, ["export", "--ckpt", "ck", "--output", "out"], contains="refused"), marker)


@case("1", "fit --ckpt_path: resume from a folder with a planted .metadata")
def _(work):
    marker = work / "marker"
    sharded_checkpoint(work / "ck", marker)
    tiny_fit_data(work)
    return with_marker(cli(work, [*TINY_FIT, "--ckpt_path", "ck"], contains="refused"), marker)


@case("-", "export: a clean sharded checkpoint")
def _(work):
    sharded_checkpoint(work / "ck")
    return cli(work, ["export", "--ckpt", "ck", "--output", "out"], expect=OK, contains="exported")


SANDBOX_ATTEMPTS = {
    "socket to a local listener": "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
    "_socket to a local listener": "import _socket; s = _socket.socket(); s.connect(('127.0.0.1', {port}))",
    "importlib.reload(socket)": (
        "import importlib, socket; importlib.reload(socket); socket.create_connection(('127.0.0.1', {port}))"
    ),
    "child python to a local listener": (
        "import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "\"import socket; socket.create_connection(('127.0.0.1', {port}))\"], check=True)"
    ),
    "write outside its folder": "open({marker!r}, 'w').write('x')",
    "os.system": "import os; assert os.system('touch {marker}') == 0",
    "child outliving the timeout": (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
        "'{tag}'], start_new_session=True); time.sleep(60)"
    ),
}


def sandbox_case(name: str, code: str):
    @case("2", f"HumanEval sandbox: {name}")
    def _(work):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        marker, tag = Path("/var/tmp") / f"cllm-probe-{uuid.uuid4().hex}", f"cllm-probe-{uuid.uuid4().hex}"
        program = code.format(port=listener.getsockname()[1], marker=str(marker), tag=tag)
        call = f"print('pass' if run_sandboxed({program!r}, 2) else 'fail')"
        snippet = f"from cllm.evaluation import run_sandboxed; {call}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=120)
        time.sleep(0.3)
        try:
            listener.accept()[0].close()
            reached = True
        except BlockingIOError:
            reached = False
        listener.close()
        alive = any(tag.encode() in _cmdline(pid) for pid in os.listdir("/proc") if pid.isdigit())
        written = marker.exists()
        marker.unlink(missing_ok=True)
        escaped = [what for what, hit in (("connected", reached), ("wrote", written), ("survived", alive)) if hit]
        verdict = (done.stdout.strip().splitlines() or [done.stderr.strip()[-200:]])[-1]
        seen = f"{verdict}; " + (f"ESCAPED: {', '.join(escaped)}" if escaped else "nothing reached outside")
        command = f"run_sandboxed({clean(program, work)!r})"
        return Outcome(command, done.returncode, seen, not escaped and verdict == "fail")


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


for _name, _code in SANDBOX_ATTEMPTS.items():
    sandbox_case(_name, _code)


# -- data that can silently change (items 3-6) --------------------------------------------------------------------


def data_fit(work: Path, *extra: str) -> list[str]:
    return [*TINY_FIT, "--data.init_args.path=data", "--data.init_args.max_new_tokens=16", *extra]


@case("3", "fit on a shard edited after collection (still valid JSON)")
def _(work):
    folder = dataset(work)
    shard = folder / "shard-00000.jsonl"
    # one token of the first state changed: same line count, valid JSON, a different dataset
    shard.write_text(re.sub(r'"states":\[\[(\d+)', lambda m: f'"states":[[{int(m[1]) + 1}', shard.read_text(), count=1))
    return cli(work, data_fit(work), contains="checksum")


@case("3", "fit with a wrong sha256 in the manifest")
def _(work):
    folder = dataset(work)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return cli(work, data_fit(work), contains="checksum")


@case("4", "resumed collection after the prompt file's content changed (same count)")
def _(work):
    prompts = write_prompts(work / "p.jsonl", [f"def f{i}(x):" for i in range(4)])
    args = ["trajectories", "--model", "tiny", "--prompts", "p.jsonl", "--n", "4", "--max_new_tokens", "8",
            "--chat_template", "false", "--shard_size", "2", "--output", "out"]  # fmt: skip
    first = cli(work, args, expect=OK)
    if not first.ok:
        return first
    (work / "out" / "shard-00001.jsonl").unlink()  # as if the first run was killed after one shard
    (work / "out" / "manifest.json").unlink(missing_ok=True)
    write_prompts(prompts, [f"def g{i}(y):" for i in range(4)])
    return cli(work, args, contains="prompts")


def settings_case(key: str, value: str, phrase: str):
    @case("5", f"fit on a folder collected with another {key}")
    def _(work):
        dataset(work)
        return cli(work, data_fit(work, f"--data.init_args.{key}={value}"), contains=phrase)


settings_case("prompts", "json-extract:train", "prompts")
settings_case("max_new_tokens", "64", "max_new_tokens")
settings_case("init", "repeat", "init")


@case("5", "fit on a folder whose model weights were replaced in place")
def _(work):
    from cllm.models import build_tiny

    for seed in (0, 3):
        model, tokenizer = build_tiny(f"tiny:seed={seed}")
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        if seed == 0:
            args = [arg if arg != "tiny" else "model" for arg in TINY_COLLECT]
            result = cli(work, [*args, "--output", "data"], expect=OK)
            if not result.ok:
                return result
    return cli(work, data_fit(work, "--data.init_args.model=model"), contains="weights changed")


def official_entry(data_id: str, ids: list[int], labels: list[int] | None = None) -> dict:
    entry = {
        "data_id": data_id,
        "jacobian_itr_id": "itr_0",
        "prompt_ids_len": [3],
        "prompt_ids": [[5, 6, 7]],
        "answer_trajectory_ids": [[ids], [ids]],
        "teacher_output_ids": [[5, 6, 7, *ids]],
    }
    if labels is not None:
        entry["labels_ids"] = [labels]
    return entry


def import_args(source: str) -> list[str]:
    return ["trajectories", "--model", "tiny", "--import_official", source, "--output", "out"]


@case("6", "import into a folder holding a stale shard")
def _(work):
    (work / "official.json").write_text(json.dumps([official_entry("data_0", [8, 9, 10, 11])]))
    (work / "out").mkdir()
    shutil.copy(dataset(work) / "shard-00000.jsonl", work / "out" / "shard-00009.jsonl")
    return cli(work, import_args("official.json"), contains="out")


@case("6", "import token ids beyond the vocabulary")
def _(work):
    (work / "official.json").write_text(json.dumps([official_entry("data_0", [8, 9, 10, 99999])]))
    return cli(work, import_args("official.json"), contains="vocabulary")


@case("6", "import labels that do not start with the prompt")
def _(work):
    entry = official_entry("data_0", [8, 9, 10, 11], labels=[1, 2, 3, 20, 21])
    (work / "official.json").write_text(json.dumps([entry]))
    return cli(work, import_args("official.json"), expect=OK, contains="do not start with the prompt")


# -- resume and reruns (items 7-8) --------------------------------------------------------------------------------


@case("7", "kill -9 during fit, then --ckpt_path last")
def _(work):
    tiny_fit_data(work)
    args = ["fit", "--config", "tiny.yaml", "--trainer.max_steps=40", "--trainer.limit_val_batches=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(work / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "cllm", *args], cwd=work, env=env, stdout=log, stderr=log)
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not list(work.rglob("last*.ckpt")):
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait()
    if not list(work.rglob("last*.ckpt")):
        return Outcome(shown(work, args), first.returncode, "no last.ckpt written before the kill", False)
    return cli(work, [*args[:3], "--trainer.max_steps=2", "--ckpt_path", "last"], expect=OK, contains="Restoring")


@case("8", "rerun after a collection that failed on an empty prompt")
def _(work):
    write_prompts(work / "p.jsonl", ["def f(x):", ""])
    args = ["trajectories", "--model", "tiny", "--prompts", "p.jsonl", "--n", "4", "--max_new_tokens", "8",
            "--chat_template", "false", "--output", "out"]  # fmt: skip
    failed = cli(work, args)
    write_prompts(work / "p.jsonl", ["def f(x):", "def g(y):"])
    rerun = cli(work, args, expect=OK, contains="records")
    rerun.note = f"first run: {failed.seen}; " + rerun.note
    return rerun


# -- one clear line instead of a traceback (items 9-10) -----------------------------------------------------------

COLLECT = ["trajectories", "--model", "tiny", "--n", "4", "--max_new_tokens", "8", "--chat_template", "false"]


def collect_case(item: str, name: str, prompts: list[str] | bytes | None, extra: list[str], phrase: str = ""):
    @case(item, name)
    def _(work):
        source = "stdlib-code:train"
        if isinstance(prompts, bytes):
            (work / "p.jsonl").write_bytes(prompts)
            source = "p.jsonl"
        elif prompts is not None:
            write_prompts(work / "p.jsonl", prompts)
            source = "p.jsonl"
        return cli(work, [*COLLECT, "--prompts", source, "--limit", "4", "--output", "out", *extra], contains=phrase)


collect_case("9", "trajectories: an empty prompt (--init repeat)", ["def f(x):", ""], ["--init", "repeat"], "empty")
collect_case("9", "trajectories: invalid UTF-8 in the prompt file", b'{"prompt": "\xff\xfe"}\n', [], "UTF-8")
collect_case("9", "trajectories: --n 0", None, ["--n", "0"], "n")
collect_case("9", "trajectories: --shard_size 0", None, ["--shard_size", "0"], "shard_size")
collect_case("9", "trajectories: --batch_size 0", None, ["--batch_size", "0"], "batch_size")


@case("10", "trajectories: duplicate prompt ids in the prompt file")
def _(work):
    write_prompts(work / "p.jsonl", ["def f(x):", "def g(y):"], ids=["same", "same"])
    return cli(work, [*COLLECT, "--prompts", "p.jsonl", "--output", "out"], contains="same")


def mounted(work: Path, options: str) -> Path:
    """A tmpfs mounted at work/out with `options` (ro, size=...); root only."""
    out = work / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(out)], check=True)
    CACHE.setdefault("mounts", []).append(out)
    return out


@case("9", "trajectories: a read-only output folder")
def _(work):
    mounted(work, "ro")
    return cli(work, [*COLLECT, "--prompts", "stdlib-code:train", "--limit", "2", "--output", "out"], contains="out")


@case("9", "trajectories: a full output folder")
def _(work):
    mounted(work, "size=8k")
    return cli(work, [*COLLECT, "--prompts", "stdlib-code:train", "--limit", "8", "--output", "out"], contains="out")


DECODE = ["--model", "tiny", "--n", "4", "--no-chat-template"]


@case("9", "bench --max-new-tokens 0")
def _(work):
    return cli(work, ["bench", *DECODE, "--prompts", "stdlib-code:test", "--limit", "1", "--max-new-tokens", "0"])


@case("9", "generate --device cuda on a CPU build")
def _(work):
    import torch

    if torch.cuda.is_available():
        return Outcome("cllm generate --device cuda", 0, "(skipped: this machine has CUDA)", True)
    return cli(work, ["generate", *DECODE, "--prompt", "def f(x):", "--device", "cuda"], contains="cuda")


@case("9", "generate --init bogus")
def _(work):
    return cli(work, ["generate", *DECODE, "--prompt", "def f(x):", "--init", "bogus"], contains="bogus")


@case("10", "generate --max-new-tokens -1")
def _(work):
    return cli(work, ["generate", *DECODE, "--prompt", "def f(x):", "--max-new-tokens", "-1"], contains="max")


@case("10", "generate: a mistyped local model path (fails at once, no hub retries)")
def _(work):
    outcome = cli(work, ["generate", "--model", "./models/smollm2-135mm", "--prompt", "hi"], contains="not found")
    outcome.ok = outcome.ok and float(outcome.note.split()[0]) < 30
    return outcome


@case("9", "export: a corrupt .ckpt")
def _(work):
    (work / "model.ckpt").write_bytes(os.urandom(4096))
    return cli(work, ["export", "--ckpt", "model.ckpt", "--output", "out"], contains="model.ckpt")


@case("9", "export: a truncated .ckpt")
def _(work):
    path = checkpoint_file(work)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cli(work, ["export", "--ckpt", "model.ckpt", "--output", "out"], contains="model.ckpt")


@case("9", "fit --ckpt_path a truncated .ckpt")
def _(work):
    path = checkpoint_file(work)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    tiny_fit_data(work)
    return cli(work, [*TINY_FIT, "--ckpt_path", "model.ckpt"], contains="model.ckpt")


@case("9", "export: a sharded folder with its shard deleted")
def _(work):
    folder = sharded_checkpoint(work / "ck")
    for shard in folder.glob("*.distcp"):
        shard.unlink()
    return cli(work, ["export", "--ckpt", "ck", "--output", "out"], contains="ck")


@case("9", "fit: n larger than max_new_tokens")
def _(work):
    (work / "data").mkdir()
    return cli(work, [*TINY_FIT, "--data.init_args.n=32", "--data.init_args.max_length=512"], contains="n")


@case("10", "fit: a typo in an override (short message)")
def _(work):
    outcome = cli(work, ["fit", "--config", "tiny.yaml", "--trainer.max_stepz=1"], contains="max_stepz")
    return outcome


@case("10", "fit: a negative ar_weight")
def _(work):
    tiny_fit_data(work)
    return cli(work, [*TINY_FIT, "--model.init_args.ar_weight=-1"], contains="ar_weight")


@case("10", "fit: the data module's own collection resumes per shard (collect_shard_size)")
def _(work):
    return cli(work, ["fit", "--config", "tiny.yaml", "--data.init_args.collect_shard_size=2", "--print_config"], OK)


@case("-", "trajectories: a missing prompt file")
def _(work):
    return cli(work, [*COLLECT, "--prompts", "missing.jsonl", "--output", "out"], contains="missing.jsonl")


@case("-", "fit on a dataset made with another tokenizer")
def _(work):
    folder = dataset(work)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizer_fingerprint"] = "0123456789abcdef"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return cli(work, data_fit(work), contains="tokenizer")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated words: run the cases whose name contains one")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args()
    words = [w for w in args.only.split(",") if w]
    selected = [c for c in CASES if not words or any(w in c.name for w in words)]
    rows = []
    try:
        for number, item in enumerate(selected, 1):
            work = Path(tempfile.mkdtemp(prefix="cllm-probe-"))
            try:
                outcome = item.run(work)
            except Exception as err:  # a broken case is a failed case, not a broken probe
                outcome = Outcome("(setup)", -1, f"probe error: {type(err).__name__}: {err}"[:220], False)
            finally:
                for mount in CACHE.pop("mounts", []):
                    subprocess.run(["umount", str(mount)], check=False)
                shutil.rmtree(work, ignore_errors=True)
            rows.append({"item": item.item, "name": item.name, **outcome.__dict__})
            print(f"[{number}/{len(selected)}] {'ok  ' if outcome.ok else 'FAIL'} {item.name}: {outcome.seen}")
    finally:
        shutil.rmtree(base(), ignore_errors=True)
    if not words:
        command = "python scripts/reliability_probe.py"
        args.output.write_text(markdown(rows, command))
        data = ROOT / "docs" / "results" / "reliability.json"
        data.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.output} and {data}")


if __name__ == "__main__":
    main()

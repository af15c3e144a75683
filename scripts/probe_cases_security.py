"""Reliability probe cases, security (items 1-2): payloads planted in checkpoints, HumanEval sandbox escapes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from probe_harness import OK, TINY_FIT, Outcome, case, clean, cli, sharded_checkpoint, tiny_fit_data, with_marker

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

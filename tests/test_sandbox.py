"""Real escape attempts against the HumanEval sandbox (bubblewrap): none may succeed, and none may score a pass.

Each attempt targets something the test can observe from outside: a TCP listener on 127.0.0.1, a marker file in a
host folder, a process with a unique tag in /proc.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from cllm import evaluation
from cllm.evaluation import humaneval_pass_at_1, run_sandboxed

if evaluation.sandbox_problem() is not None and not os.environ.get("CI"):
    pytest.skip(f"no sandbox here: {evaluation.sandbox_problem()}", allow_module_level=True)

pytestmark = pytest.mark.slow  # subprocesses (about 0.2 s each)


@pytest.fixture
def target(tmp_path):
    """A listener on 127.0.0.1, two marker paths (host /tmp and /var/tmp) and a process tag; checks none was hit."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    tag = f"cllm-escape-{uuid.uuid4().hex}"
    markers = [tmp_path / "escaped", Path("/var/tmp") / tag]
    yield {"port": listener.getsockname()[1], "markers": markers, "tag": tag}
    try:
        connection, _ = listener.accept()
        connection.close()
        reached = True
    except BlockingIOError:
        reached = False
    listener.close()
    written = [str(marker) for marker in markers if marker.exists()]
    for marker in markers:
        marker.unlink(missing_ok=True)
    for _ in range(20):  # the pid namespace's teardown is asynchronous
        alive = [pid for pid in os.listdir("/proc") if pid.isdigit() and tag.encode() in _cmdline(pid)]
        if not alive:
            break
        time.sleep(0.05)
    assert not reached, "generated code reached a local listener"
    assert not written, f"generated code wrote outside its folder: {written}"
    assert not alive, "a child of generated code outlived its run"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


CONNECT = "({module}).create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')"
ATTEMPTS = {
    "socket": "import socket\n" + CONNECT.format(module="socket", port="{port}"),
    "_socket": "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))",
    "reload": "import importlib, socket\nimportlib.reload(socket)\n" + CONNECT.format(module="socket", port="{port}"),
    "child python": (
        "import subprocess, sys\n"
        "code = \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"\n"
        "subprocess.run([sys.executable, '-c', code], check=True)"
    ),
    "write outside": (
        "import os\nfor path in {markers!r}:\n"
        "    os.makedirs(os.path.dirname(path), exist_ok=True)\n    open(path, 'w').write('x')"
    ),
    "os.system": "import os\nassert os.system('touch ' + ' '.join({markers!r})) == 0",
    "orphan after exit": (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{tag}'], start_new_session=True)"
    ),
    "orphan at timeout": (
        "import os, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{tag}'], start_new_session=True)\n"
        "time.sleep(60)"
    ),
}


def attempt(name: str, target: dict) -> str:
    markers = [str(marker) for marker in target["markers"]]
    return ATTEMPTS[name].format(port=target["port"], markers=markers, tag=target["tag"])


@pytest.mark.parametrize("name", sorted(ATTEMPTS))
def test_escape_attempt_fails(name, target):
    run_sandboxed(attempt(name, target), timeout=2.0)  # the target fixture asserts nothing was reached


def test_a_completion_trying_every_escape_scores_only_on_its_tests(target):
    problem = {
        "prompt": "def add(a, b):\n    '''Sum of a and b.'''\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    escapes = "".join(
        f"try:\n    exec({attempt(name, target)!r})\nexcept BaseException:\n    pass\n"
        for name in sorted(ATTEMPTS)
        if name != "orphan at timeout"
    )
    wrong = f"```python\n{escapes}def add(a, b):\n    return a - b\n```"
    right = f"```python\n{escapes}def add(a, b):\n    return a + b\n```"
    cheat = f"```python\n{escapes}import os\nos._exit(0)\n```"  # exit 0 before the tests ran
    assert humaneval_pass_at_1([problem] * 3, [wrong, cheat, right], timeout=5.0) == [False, False, True]


def test_memory_and_time_limits():
    assert run_sandboxed("x = bytearray(3 << 30)", timeout=5.0) is False
    assert run_sandboxed("while True: pass", timeout=1.0) is False
    assert run_sandboxed("print('ok')", timeout=5.0) is True


def test_an_interpreter_under_tmp_stays_visible_over_the_private_tmp():
    """A venv in a temporary clone (/tmp/...) is bound read-only over the sandbox's empty /tmp, after it."""
    command = evaluation.bwrap_command("/tmp/clone/.venv/bin/python")
    tmpfs = command.index("/tmp")
    rebind = command.index("/tmp/clone/.venv/bin")
    assert command[rebind - 1] == "--ro-bind" and rebind > tmpfs
    assert "/tmp" not in evaluation.interpreter_under_tmp("/usr/bin/python3")

"""Quality checks for generated code: HumanEval execution in a bubblewrap sandbox, code extraction.

Generated code never runs in this process. Each program runs in a fresh `python -I` inside `bwrap`: no network
(its own empty network namespace), its own pid/ipc/uts namespaces, an unprivileged user, a read-only view of the
root file system, a private size-limited writable /tmp as its working folder, memory / CPU-time / file-size
limits, and a wall-clock limit at which its whole process session is killed (the pid namespace takes every child
with it). A program passes only when it exits 0 *and* printed the run's random token after `check(...)` returned,
so `os._exit(0)` or `sys.exit(0)` before the tests cannot score a pass.

Without a working `bwrap` nothing is executed unless the caller asks for it with `unsafe_exec=True`
(`--unsafe-exec` on the command line): then the program runs as a plain subprocess with the same limits.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

from cllm.errors import UserError

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
MEMORY_LIMIT = 2 << 30  # address space of the sandboxed program, bytes
FILE_LIMIT = 16 << 20  # largest file it may write (stdout included), bytes
TMP_SIZE = 64 << 20  # its private /tmp
NOBODY = "65534"
INSTALL_HINT = "install bubblewrap (apt-get install bubblewrap) or pass --unsafe-exec to run it without a sandbox"


def extract_code(text: str) -> str:
    """The first fenced code block of a chat answer, or the whole text when it has none."""
    match = CODE_BLOCK.search(text)
    return match.group(1) if match else text


def humaneval_program(problem: dict, answer: str) -> str:
    """Prompt (imports, helpers, the stub with its docstring) + the model's code + the tests + the check call.

    The model answers with the whole function, so its definition replaces the stub's.
    """
    return "\n".join([problem["prompt"], extract_code(answer), problem["test"], f"check({problem['entry_point']})", ""])


def interpreter_under_tmp(python: str = sys.executable) -> list[str]:
    """The interpreter's folders that lie under /tmp (a venv in a temporary clone): the private /tmp would hide them."""
    folders = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(python)), os.path.dirname(python)}
    return sorted(f for f in map(os.path.realpath, folders) if f.startswith("/tmp/"))


def bwrap_command(python: str = sys.executable) -> list[str]:
    """The bubblewrap prefix that runs `python -I -` in the sandbox (the program comes on stdin)."""
    rebinds = [arg for folder in interpreter_under_tmp(python) for arg in ("--ro-bind", folder, folder)]
    return [
        "bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--size", str(TMP_SIZE), "--tmpfs", "/tmp",
        *rebinds,  # read-only, over the private /tmp
        "--unshare-all",  # network, pid, ipc, uts, cgroup: the network namespace has only a downed loopback
        "--unshare-user", "--uid", NOBODY, "--gid", NOBODY,
        "--die-with-parent",
        "--new-session",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "PYTHONHASHSEED", "0",
        "--chdir", "/tmp",
        python, "-I", "-",
    ]  # fmt: skip


@functools.cache
def sandbox_problem() -> str | None:
    """None when bubblewrap works on this machine, else why not (probed once per process)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        probe = subprocess.run(
            bwrap_command(), input=b"print('ok')", capture_output=True, timeout=30, check=False, start_new_session=True
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap does not start ({err})"
    if probe.returncode != 0 or probe.stdout.strip() != b"ok":
        return f"bwrap does not work here: {probe.stderr.decode(errors='replace').strip()[:200]}"
    return None


def require_sandbox(unsafe_exec: bool = False) -> None:
    """Raise a `UserError` before any model-written code is generated when it could not run sandboxed."""
    problem = sandbox_problem()
    if problem is not None and not unsafe_exec:
        raise UserError(f"HumanEval executes model-written code, and {problem}; {INSTALL_HINT}")


def _limits(timeout: float) -> None:  # runs in the child (bwrap, or python with --unsafe-exec) before exec
    import resource

    cpu = int(timeout) + 1
    for limit, value in (
        (resource.RLIMIT_AS, MEMORY_LIMIT),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, FILE_LIMIT),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))


def run_sandboxed(program: str, timeout: float = 10.0, *, unsafe_exec: bool = False) -> bool:
    """True when `program` runs to its end (its last line executed) and exits 0 within `timeout` seconds.

    Raises `UserError` when bubblewrap is missing and `unsafe_exec` is False.
    """
    require_sandbox(unsafe_exec)
    token = secrets.token_hex(16)
    # The token is printed only once the whole program ran; stdout goes to a file so its size is bounded.
    source = f"{program}\nprint({token!r}, flush=True)\n"
    sandboxed = sandbox_problem() is None
    with tempfile.TemporaryDirectory(prefix="cllm-exec-") as folder:
        command = bwrap_command() if sandboxed else [sys.executable, "-I", "-"]
        with open(os.path.join(folder, "stdout"), "w+b") as stdout:
            child = subprocess.Popen(
                command,
                cwd=folder,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed as a whole at the timeout
                preexec_fn=functools.partial(_limits, timeout) if sys.platform.startswith("linux") else None,
            )
            try:
                child.communicate(source.encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            finally:
                _kill_session(child)
            stdout.seek(max(0, os.fstat(stdout.fileno()).st_size - 256))
            tail = stdout.read().decode(errors="replace").split()
    return child.returncode == 0 and tail[-1:] == [token]


def _kill_session(child: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (a child that daemonized inside bwrap dies with its pid namespace)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def humaneval_pass_at_1(
    problems: list[dict], answers: list[str], timeout: float = 10.0, *, unsafe_exec: bool = False
) -> list[bool]:
    """Greedy pass@1: one answer per problem, each executed against the problem's tests (see `run_sandboxed`)."""
    return [
        run_sandboxed(humaneval_program(problem, answer), timeout, unsafe_exec=unsafe_exec)
        for problem, answer in zip(problems, answers)
    ]

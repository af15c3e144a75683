"""Quality checks for generated code: HumanEval execution in a sandboxed subprocess, code extraction.

Generated code never runs in this process: each program runs in a fresh `python -I` subprocess, in an empty
temporary folder, with a wall-clock limit, a memory limit and the socket module disabled.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)

# Prepended to every program: no network from generated code (best effort inside the child interpreter).
SANDBOX_PREAMBLE = """
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled for generated code")
_socket.socket = _no_network
_socket.create_connection = _no_network
del _socket
"""


def extract_code(text: str) -> str:
    """The first fenced code block of a chat answer, or the whole text when it has none."""
    match = CODE_BLOCK.search(text)
    return match.group(1) if match else text


def humaneval_program(problem: dict, answer: str) -> str:
    """Prompt (imports, helpers, the stub with its docstring) + the model's code + the tests + the check call.

    The model answers with the whole function, so its definition replaces the stub's.
    """
    return "\n".join([problem["prompt"], extract_code(answer), problem["test"], f"check({problem['entry_point']})", ""])


def _limit_memory() -> None:  # runs in the child before exec
    import resource

    limit = 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_sandboxed(program: str, timeout: float = 10.0) -> bool:
    """True when `program` exits 0 within `timeout` seconds in an isolated subprocess."""
    with tempfile.TemporaryDirectory(prefix="cllm-exec-") as folder:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", SANDBOX_PREAMBLE + program],
                cwd=folder,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                preexec_fn=_limit_memory if sys.platform.startswith("linux") else None,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def humaneval_pass_at_1(problems: list[dict], answers: list[str], timeout: float = 10.0) -> list[bool]:
    """Greedy pass@1: one answer per problem, each executed against the problem's tests."""
    return [run_sandboxed(humaneval_program(problem, answer), timeout) for problem, answer in zip(problems, answers)]

"""The one exception type users see as a clean message (exit code 2, no traceback)."""


class UserError(Exception):
    """Bad input from the user: a wrong flag, a missing file, a malformed record.

    The message must say what was wrong, where (file:line, config key) and, where it helps, what to do.
    `cllm.cli.main` prints it as one line and exits with code 2.
    """

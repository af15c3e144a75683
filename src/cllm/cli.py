"""`python -m cllm COMMAND`: LightningCLI for fit/validate, plus the extra commands.

Every command parses with jsonargparse (`cllm.arguments`): `--help`, `--config FILE`, `--print_config` and both
flag spellings (`--max_new_tokens`, `--max-new-tokens`) everywhere. Each extra command's module exposes
`main(argv: list[str]) -> None` over its settings dataclass; a `UserError` from any command becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from cllm import ablate, bench, collection, evaluate, export, generate, recipe, results_table, serve
from cllm.errors import UserError
from cllm.lightning_cli import run_lightning

LIGHTNING_COMMANDS = ("fit", "validate")  # the held-out evaluation is `cllm evaluate`, not a Lightning loop
# A read-only, full or forbidden output folder is the user's to fix: one line, not a traceback.
ENVIRONMENT_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# command -> (its main(argv), one-line description)
EXTRA_COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "trajectories": (collection.main, "collect Jacobi trajectories of a model on a prompt set"),
    "generate": (generate.main, "Jacobi-decode one prompt and print the completion with its statistics"),
    "run": (recipe.main, "a recipe end to end: collect, fit, export, evaluate, report (configs/recipes/)"),
    "results": (results_table.main, "docs/results.md and README's table, generated from the committed reports"),
    "evaluate": (evaluate.main, "quality, tokens/step and paired speed vs AR and vs the base model; results.json"),
    "bench": (bench.main, "the speed half of evaluate (no quality): paired tokens/s vs AR, tokens/step"),
    "export": (export.main, "turn a Lightning checkpoint into a Hugging Face model folder"),
    "ablate": (ablate.main, "run the ablation overlays and collect their final metrics into a table"),
    "serve": (serve.main, "serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming)"),
}

HELP = """usage: python -m cllm COMMAND [options]

Training (LightningCLI; `python -m cllm fit --help` for every option):
  fit          train a CLLM:  python -m cllm fit --config smollm2-135m.yaml
  validate     run validation of a model/checkpoint

Decoding and data (`python -m cllm COMMAND --help` for its options):
{extra}

Every command takes --help, --config FILE and --print_config, and flags in both spellings (--max_new_tokens,
--max-new-tokens). `--config NAME.yaml` is looked up in the current folder first, then in the bundled configs/.
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        extra = "\n".join(f"  {name:<12} {text}" for name, (_, text) in EXTRA_COMMANDS.items())
        print(HELP.format(extra=extra))
        return
    command = argv[0]
    try:
        if command in LIGHTNING_COMMANDS:
            run_lightning(argv)
        elif command in EXTRA_COMMANDS:
            EXTRA_COMMANDS[command][0](argv[1:])
        else:
            raise UserError(f"unknown command {command!r}; run `python -m cllm --help` for the list")
    except UserError as err:
        print(f"cllm {command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRORS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"cllm {command}: error: {where}{err.strerror} (check the folder's permissions and free space)",
            file=sys.stderr,
        )
        sys.exit(2)

"""`python -m cllm COMMAND`: LightningCLI for fit/validate/test/predict, plus the extra commands.

Extra commands live in their own modules and expose `main(argv: list[str]) -> None`; a `UserError` from any
command becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from importlib import resources
from pathlib import Path

from cllm.errors import UserError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# command -> (module with main(argv), one-line description)
EXTRA_COMMANDS = {
    "trajectories": ("cllm.trajectory", "collect Jacobi trajectories of a model on a prompt set"),
    "generate": ("cllm.generate", "Jacobi-decode one prompt and print the completion with its statistics"),
    "bench": ("cllm.bench", "greedy AR vs Jacobi on a prompt set: tokens/s, accepted tokens per step"),
    "export": ("cllm.export", "turn a Lightning checkpoint into a Hugging Face model folder"),
    "ablate": ("cllm.ablate", "run the ablation overlays and collect their final metrics into a table"),
}

HELP = """usage: python -m cllm COMMAND [options]

Training (LightningCLI; `python -m cllm fit --help` for every option):
  fit          train a CLLM:  python -m cllm fit --config smollm2-135m.yaml
  validate     run validation of a model/checkpoint
  test         run the test loop
  predict      run the predict loop

Decoding and data:
{extra}

`--config NAME.yaml` is looked up in the current folder first, then in the bundled configs/.
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
            run_lightning(resolve_config_args(argv))
        elif command in EXTRA_COMMANDS:
            module_name = EXTRA_COMMANDS[command][0]
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                if err.name != module_name:
                    raise
                raise UserError(f"command {command!r} is not yet available in this version of cllm") from None
            module.main(argv[1:])
        else:
            raise UserError(f"unknown command {command!r}; run `python -m cllm --help` for the list")
    except UserError as err:
        print(f"cllm {command}: error: {err}", file=sys.stderr)
        sys.exit(2)


def bundled_config_dir() -> Path:
    return Path(str(resources.files("cllm.configs")))


def resolve_config(name: str) -> str:
    """`NAME.yaml` as given if it exists, else the bundled config of that name, else an error listing them."""
    if Path(name).exists():
        return name
    bundled = bundled_config_dir() / name
    if bundled.is_file():
        return str(bundled)
    available = sorted(str(p.relative_to(bundled_config_dir())) for p in bundled_config_dir().rglob("*.yaml"))
    raise UserError(f"config {name!r} not found in the current folder nor among the bundled configs: {available}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every `--config X` / `--config=X` to a path that exists (see `resolve_config`)."""
    resolved = []
    iterator = iter(argv)
    for arg in iterator:
        if arg == "--config":
            resolved += [arg, resolve_config(next(iterator, ""))]
        elif arg.startswith("--config="):
            resolved.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            resolved.append(arg)
    return resolved


def run_lightning(argv: list[str]) -> None:
    from cllm.lightning_cli import CLLMLightningCLI

    # LightningCLI reads sys.argv itself (passing args= too only earns a warning); show `cllm` as the program.
    sys.argv = ["cllm", *argv]
    CLLMLightningCLI()

"""The one command-line convention of every `cllm` command: jsonargparse over a settings dataclass.

Every command (`fit` through LightningCLI, which stands on jsonargparse too; the others through `parse_settings`)
takes `--help`, `--config FILE` (YAML holding any of its options) and `--print_config`, and every flag in both
spellings: `--max_new_tokens` and `--max-new-tokens`. A boolean flag alone means true (`--clean`), `--no_clean`
(or `--no-clean`) false. `--config NAME.yaml` is looked up in the current folder first, then in the bundled
`configs/`. A bad flag or value is one line naming the option and what it accepts (`cllm.errors.UserError`: exit
code 2), not the whole usage.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser

from cllm.errors import UserError

Settings = TypeVar("Settings")


def bundled_config_dir() -> Path:
    """The folder of the bundled configs (`configs/`, installed as the package `cllm.configs`)."""
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


def normalize_flags(
    argv: list[str], booleans: frozenset[str] = frozenset(), lists: frozenset[str] = frozenset()
) -> list[str]:
    """Both spellings, bare booleans and lists: `--max-new-tokens 8` -> `--max_new_tokens 8`; for a name in
    `booleans`, `--clean` (followed by another flag or nothing) -> `--clean=true` and `--no-clean` ->
    `--clean=false`; for a name in `lists`, `--overlays a b` -> `--overlays=["a", "b"]` (and a repeated list flag
    adds to the earlier one: `--decoder a --decoder b` -> `--decoder=["a", "b"]`).

    Only flag names (before any `=`) change; values, and everything after a lone `--`, stay as they are.
    """
    result: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            return result + argv[i - 1 :]
        if not arg.startswith("--") or len(arg) == 2:
            result.append(arg)
            continue
        name, equals, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        following = argv[i] if i < len(argv) else "--"
        if not equals and name.startswith("no_") and name[3:] in booleans:
            result.append(f"--{name[3:]}=false")
        elif not equals and name in booleans and following.startswith("--"):
            result.append(f"--{name}=true")
        elif not equals and name in lists and not following.startswith("["):
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            earlier = f"--{name}="
            if repeated := [k for k, a in enumerate(result) if a.startswith(earlier) and a[len(earlier) :][:1] == "["]:
                # a repeated list flag adds to the earlier one: `--decoder a --decoder b` -> ["a", "b"]
                values = json.loads(result.pop(repeated[-1])[len(earlier) :]) + values
            result.append(f"--{name}={json.dumps(values)}")
        else:
            result.append(f"--{name}{equals}{value}")
    return result


def describe_type(hint: Any) -> str:
    """What a type accepts, in words: `int`, `one of 'a', 'b'`, `int or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if args and origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def one_line(message: str, parser: ArgumentParser) -> str:
    """jsonargparse's (often multi-line) error as one line naming the option and what it accepts."""
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if match:
        key, detail = match.groups()
        hint = next((getattr(a, "_typehint", None) for a in parser._actions if a.dest == key), None)
        got = re.search(r"(?:Given|Got) value: ?(.*?)\s*$", detail, re.S)
        if hint is not None and got:
            return f"--{key}: expected {describe_type(hint)}, got {got.group(1).strip()!r}"
        return f"--{key}: " + " ".join(detail.split())
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [f"--{name.strip()}" for name in required.group(1).split(",")]
        return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} required; see `{parser.prog} --help`"
    if message.startswith("unrecognized arguments"):
        return f"{' '.join(message.split())}; see `{parser.prog} --help` for the options"
    return " ".join(message.split())


def boolean_fields(settings: type) -> frozenset[str]:
    hints = typing.get_type_hints(settings)
    return frozenset(f.name for f in dataclasses.fields(settings) if hints[f.name] is bool)


def list_fields(settings: type) -> frozenset[str]:
    hints = typing.get_type_hints(settings)
    return frozenset(f.name for f in dataclasses.fields(settings) if "list[" in str(hints[f.name]))


def settings_parser(settings: type, prog: str, description: str | None = None) -> ArgumentParser:
    """A jsonargparse parser for the fields of the dataclass `settings` (help from its docstring's Args)."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file holding any of the options below")
    parser.add_class_arguments(settings, fail_untyped=True)
    return parser


def parse_settings(settings: type[Settings], argv: list[str], prog: str, description: str | None = None) -> Settings:
    """Parse `argv` into an instance of the dataclass `settings`; a bad flag or value raises a one-line UserError."""
    parser = settings_parser(settings, prog, description)
    argv = normalize_flags(resolve_config_args(list(argv)), boolean_fields(settings), list_fields(settings))
    try:
        parsed = parser.parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError (argparse's, or its own for types)
        if type(err).__name__ != "ArgumentError":
            raise
        raise UserError(one_line(str(err), parser)) from None
    return settings(**{f.name: parsed[f.name] for f in dataclasses.fields(settings)})


def run_script(main: Callable[[list[str]], None]) -> None:
    """`main(sys.argv[1:])` of a script (`benchmarks/`) as `cllm` runs a command: a `UserError` is one line on stderr
    naming the script, and exit code 2."""
    try:
        main(sys.argv[1:])
    except UserError as err:
        print(f"{sys.argv[0]}: error: {err}", file=sys.stderr)
        sys.exit(2)

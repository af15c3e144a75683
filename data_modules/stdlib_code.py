"""The bundled `stdlib-code` prompt set: complete a documented function of the Python standard library.

Built offline from the interpreter's own stdlib sources with `ast` (files are read, never imported: importing
some modules has side effects). A function qualifies when it is public (no leading underscore), has a docstring
and a body of 3 to 40 lines besides it; methods count (id `module.Class.method`). The prompt shows the signature
and docstring; the answer is the whole function. Split by top-level package, by a hash of its name (about
80% train, 10% validation, 10% test), so related code never crosses splits. Order is deterministic (sorted
files, then source order). The set depends on the Python version; it is cached under the cllm cache folder.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import textwrap
from pathlib import Path

from cllm.errors import UserError
from cllm.files import atomic_write_text, unit_hash
from cllm.models import cache_root
from cllm.records import Prompt

SPLITS = ("train", "validation", "test")
MIN_BODY_LINES, MAX_BODY_LINES = 3, 40
SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
INSTRUCTION = (
    "Complete the following Python function from the standard library module `{module}`. "
    "Answer with the whole function in one code block.\n\n```python\n{stub}\n```"
)
_LOADED: list[dict] | None = None


def split_of(package: str) -> str:
    value = unit_hash(package)
    return "train" if value < 0.8 else "validation" if value < 0.9 else "test"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, file) of every stdlib source file outside test and vendored folders, sorted."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_FOLDERS & set(relative.parts[:-1]):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(part.isidentifier() for part in parts):
            found.append((".".join(parts), path))
    return found


def functions_of(module: str, source: str) -> list[dict]:
    """The qualifying documented functions of one module's source, in source order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.")
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node, clean=False)
            if docstring is None or len(node.body) < 2:
                continue
            body_lines = node.end_lineno - node.body[1].lineno + 1
            if not MIN_BODY_LINES <= body_lines <= MAX_BODY_LINES:
                continue
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            stub = textwrap.dedent("\n".join(lines[start - 1 : node.body[0].end_lineno]))
            function = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))
            found.append({"id": f"{module}.{prefix}{node.name}", "module": module, "stub": stub, "answer": function})

    visit(tree.body, "")
    return found


def build(root: Path) -> list[dict]:
    items = []
    for module, path in module_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            items += functions_of(module, source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or use other encodings: not prompts
    return items


def load_all() -> list[dict]:
    """Every qualifying function, built once per Python version and cached as JSON."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    root = stdlib_root()
    tag = hashlib.sha256(f"{sys.version}|{root}|v1".encode()).hexdigest()[:12]
    cache = cache_root() / f"stdlib-code-{tag}.json"
    if cache.is_file():
        _LOADED = json.loads(cache.read_text(encoding="utf-8"))
    else:
        _LOADED = build(root)
        atomic_write_text(cache, json.dumps(_LOADED))
    return _LOADED


def stdlib_code_prompts(split: str | None = None) -> list[Prompt]:
    """`stdlib-code:train|validation|test` (all splits when no split is given)."""
    if split is not None and split not in SPLITS:
        raise UserError(f"stdlib-code has splits {SPLITS}, not {split!r}")
    prompts = []
    for item in load_all():
        item_split = split_of(item["module"].split(".")[0])
        if split is None or item_split == split:
            text = INSTRUCTION.format(module=item["module"], stub=item["stub"])
            prompts.append(
                Prompt(item["id"], text, item["answer"], meta={"module": item["module"], "split": item_split})
            )
    return prompts

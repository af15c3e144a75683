"""Reliability probe: fault, bad-input and security cases on tiny models, tried as a user would; writes the table.

    python scripts/reliability_probe.py                     # every case -> docs/reliability.md + results JSON
    python scripts/reliability_probe.py --only export,sandbox  # cases whose name contains a word

Each case prepares files in a fresh folder, runs the command a user would (`python -m cllm ...` in a subprocess,
offline), and checks what the user sees: exit code 2 with one `cllm CMD: error: ...` line and no traceback for bad
input, exit 0 where the run must succeed, and for the security cases that the planted payload or escape left no
trace (marker file, connection, surviving process). The next probe starts from this list: add a case to the
`probe_cases_*` module of its topic.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from probe_harness import CACHE, CASES, ROOT, Outcome, base, markdown

# Each module registers its cases on import, so this order is the table's row order.
CASE_MODULES = ("probe_cases_security", "probe_cases_data", "probe_cases_input")
for _module in CASE_MODULES:
    importlib.import_module(_module)


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

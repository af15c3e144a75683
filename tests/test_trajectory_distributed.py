"""`cllm trajectories --devices 2` (Trainer.predict on 2 CPU processes) writes the same shards as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cllm.records import read_manifest


@pytest.mark.slow
def test_two_ranks_split_the_shards_without_duplicates(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"f({i})"}) + "\n" for i in range(5)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    common = [
        "--model",
        "tiny",
        "--prompts",
        str(prompts),
        "--n",
        "4",
        "--max_new_tokens",
        "12",
        "--shard_size",
        "1",
        "--batch_size",
        "2",
        "--dtype",
        "float64",
    ]
    runs = {}
    for name, extra in [("two", ["--devices", "2", "--accelerator", "cpu"]), ("one", [])]:
        out = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "cllm", "trajectories", *common, "--output", str(out), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_manifest(out)
    assert [s["file"] for s in runs["two"]["shards"]] == [f"shard-{k:05d}.jsonl" for k in range(5)]
    assert [s["sha256"] for s in runs["two"]["shards"]] == [s["sha256"] for s in runs["one"]["shards"]]
    assert runs["two"]["stats"]["prompts"] == 5

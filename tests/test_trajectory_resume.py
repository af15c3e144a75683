"""A collection killed with SIGKILL and started again gives the same records as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cllm.records import read_manifest


def command(prompts, out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cllm",
        "trajectories",
        "--model",
        "tiny",
        "--prompts",
        str(prompts),
        "--output",
        str(out),
        "--n",
        "8",
        "--max_new_tokens",
        "96",
        "--batch_size",
        "2",
        "--shard_size",
        "2",
    ]


@pytest.mark.slow
def test_killed_collection_resumes_to_the_same_records(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def g{i}(y):"}) + "\n" for i in range(8)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # 2 processes share the CPU
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    uninterrupted = subprocess.Popen(command(prompts, reference), **quiet)  # runs alongside, on the other core
    process = subprocess.Popen(command(prompts, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(killed.glob("shard-*.jsonl")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = len(list(killed.glob("shard-*.jsonl")))
    assert 1 <= finished_before < 4, "the kill should land mid-run; make the run longer if this fails"
    subprocess.run(command(prompts, killed), env=env, check=True, capture_output=True)
    assert uninterrupted.wait() == 0
    killed_manifest, reference_manifest = read_manifest(killed), read_manifest(reference)
    assert [s["sha256"] for s in killed_manifest["shards"]] == [s["sha256"] for s in reference_manifest["shards"]]
    assert len(killed_manifest["shards"]) == 4 and killed_manifest["stats"]["prompts"] == 8

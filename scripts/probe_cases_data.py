"""Reliability probe cases, data and reruns (items 3-8): data that can silently change, resume after a kill, reruns."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from probe_harness import (
    OK,
    TINY_COLLECT,
    Outcome,
    case,
    cli,
    data_fit,
    dataset,
    shown,
    tiny_fit_data,
    write_prompts,
)

# -- data that can silently change (items 3-6) --------------------------------------------------------------------


@case("3", "fit on a shard edited after collection (still valid JSON)")
def _(work):
    folder = dataset(work)
    shard = folder / "shard-00000.jsonl"
    # one token of the first state changed: same line count, valid JSON, a different dataset
    shard.write_text(re.sub(r'"states":\[\[(\d+)', lambda m: f'"states":[[{int(m[1]) + 1}', shard.read_text(), count=1))
    return cli(work, data_fit(work), contains="checksum")


@case("3", "fit with a wrong sha256 in the manifest")
def _(work):
    folder = dataset(work)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return cli(work, data_fit(work), contains="checksum")


@case("4", "resumed collection after the prompt file's content changed (same count)")
def _(work):
    prompts = write_prompts(work / "p.jsonl", [f"def f{i}(x):" for i in range(4)])
    args = ["trajectories", "--model", "tiny", "--prompts", "p.jsonl", "--n", "4", "--max_new_tokens", "8",
            "--chat_template", "false", "--shard_size", "2", "--output", "out"]  # fmt: skip
    first = cli(work, args, expect=OK)
    if not first.ok:
        return first
    (work / "out" / "shard-00001.jsonl").unlink()  # as if the first run was killed after one shard
    (work / "out" / "manifest.json").unlink(missing_ok=True)
    write_prompts(prompts, [f"def g{i}(y):" for i in range(4)])
    return cli(work, args, contains="prompts")


def settings_case(key: str, value: str, phrase: str):
    @case("5", f"fit on a folder collected with another {key}")
    def _(work):
        dataset(work)
        return cli(work, data_fit(work, f"--data.init_args.{key}={value}"), contains=phrase)


settings_case("prompts", "json-extract:train", "prompts")
settings_case("max_new_tokens", "64", "max_new_tokens")
settings_case("init", "repeat", "init")


@case("5", "fit on a folder whose model weights were replaced in place")
def _(work):
    from cllm.models import build_tiny

    for seed in (0, 3):
        model, tokenizer = build_tiny(f"tiny:seed={seed}")
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        if seed == 0:
            args = [arg if arg != "tiny" else "model" for arg in TINY_COLLECT]
            result = cli(work, [*args, "--output", "data"], expect=OK)
            if not result.ok:
                return result
    return cli(work, data_fit(work, "--data.init_args.model=model"), contains="weights changed")


def official_entry(data_id: str, ids: list[int], labels: list[int] | None = None) -> dict:
    entry = {
        "data_id": data_id,
        "jacobian_itr_id": "itr_0",
        "prompt_ids_len": [3],
        "prompt_ids": [[5, 6, 7]],
        "answer_trajectory_ids": [[ids], [ids]],
        "teacher_output_ids": [[5, 6, 7, *ids]],
    }
    if labels is not None:
        entry["labels_ids"] = [labels]
    return entry


def import_args(source: str) -> list[str]:
    return ["trajectories", "--model", "tiny", "--import_official", source, "--output", "out"]


@case("6", "import into a folder holding a stale shard")
def _(work):
    (work / "official.json").write_text(json.dumps([official_entry("data_0", [8, 9, 10, 11])]))
    (work / "out").mkdir()
    shutil.copy(dataset(work) / "shard-00000.jsonl", work / "out" / "shard-00009.jsonl")
    return cli(work, import_args("official.json"), contains="out")


@case("6", "import token ids beyond the vocabulary")
def _(work):
    (work / "official.json").write_text(json.dumps([official_entry("data_0", [8, 9, 10, 99999])]))
    return cli(work, import_args("official.json"), contains="vocabulary")


@case("6", "import labels that do not start with the prompt")
def _(work):
    entry = official_entry("data_0", [8, 9, 10, 11], labels=[1, 2, 3, 20, 21])
    (work / "official.json").write_text(json.dumps([entry]))
    return cli(work, import_args("official.json"), expect=OK, contains="do not start with the prompt")


# -- resume and reruns (items 7-8) --------------------------------------------------------------------------------


@case("7", "kill -9 during fit, then --ckpt_path last")
def _(work):
    tiny_fit_data(work)
    args = ["fit", "--config", "tiny.yaml", "--trainer.max_steps=40", "--trainer.limit_val_batches=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(work / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "cllm", *args], cwd=work, env=env, stdout=log, stderr=log)
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not list(work.rglob("last*.ckpt")):
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait()
    if not list(work.rglob("last*.ckpt")):
        return Outcome(shown(work, args), first.returncode, "no last.ckpt written before the kill", False)
    return cli(work, [*args[:3], "--trainer.max_steps=2", "--ckpt_path", "last"], expect=OK, contains="Restoring")


@case("8", "rerun after a collection that failed on an empty prompt")
def _(work):
    write_prompts(work / "p.jsonl", ["def f(x):", ""])
    args = ["trajectories", "--model", "tiny", "--prompts", "p.jsonl", "--n", "4", "--max_new_tokens", "8",
            "--chat_template", "false", "--output", "out"]  # fmt: skip
    failed = cli(work, args)
    write_prompts(work / "p.jsonl", ["def f(x):", "def g(y):"])
    rerun = cli(work, args, expect=OK, contains="records")
    rerun.note = f"first run: {failed.seen}; " + rerun.note
    return rerun

"""Issue #15: data that cannot silently change, resumable runs, and one clear line (exit 2) for every bad input.

Each case runs what a user runs (`cllm.cli.main`, in-process) and asserts what they see. The security cases are in
test_safe_checkpoint.py and test_sandbox.py; scripts/reliability_probe.py tries all of them as subprocesses and
writes docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cllm.cli import main
from cllm.data_modules.trajectory_data import TrajectoryDataModule
from cllm.errors import UserError

COLLECT = ["trajectories", "--model", "tiny", "--n", "4", "--max_new_tokens", "8", "--chat_template", "false"]
DATA = {"model": "tiny", "prompts": "stdlib-code:train", "prompt_limit": 4, "n": 4, "max_new_tokens": 8}
DATA |= {"chat_template": False, "batch_size": 2, "max_length": 256, "val_fraction": 0.25}


def user_error(capsys, argv: list[str], phrase: str = "") -> str:
    """Run the CLI; it must exit 2 with one `cllm CMD: error:` line (last on stderr) and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-2000:]
    assert phrase in errors[0], errors[0]
    return errors[0]


def write_prompts(path: Path, prompts: list[str], ids: list[str] | None = None) -> Path:
    rows = [{"prompt": text} | ({"id": ids[i]} if ids else {}) for i, text in enumerate(prompts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    """4 stdlib-code prompts, n=4, 8 new tokens, two shards (what `DATA` asks)."""
    out = tmp_path_factory.mktemp("collected") / "data"
    main([*COLLECT, "--prompts", "stdlib-code:train", "--limit", "4", "--shard_size", "2", "--output", str(out)])
    return out


@pytest.fixture
def dataset(collected, tmp_path) -> Path:
    shutil.copytree(collected, tmp_path / "data")
    return tmp_path / "data"


def data_module(path: Path, **overrides) -> TrajectoryDataModule:
    return TrajectoryDataModule(path=str(path), **(DATA | overrides))


# -- 3. checksums --------------------------------------------------------------------------------------------------


def test_an_edited_shard_is_refused_at_setup(dataset):
    shard = dataset / "shard-00000.jsonl"
    text = shard.read_text()
    shard.write_text(re.sub(r'"states":\[\[(\d+)', lambda m: f'"states":[[{int(m[1]) + 1}', text, count=1))
    with pytest.raises(UserError, match=r"shard-00000.jsonl: checksum .* does not match the manifest"):
        data_module(dataset).setup()


def test_a_wrong_manifest_checksum_is_refused_at_setup(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="shard-00001.jsonl: checksum"):
        data_module(dataset).setup()


def test_checksums_are_cached_by_size_and_mtime(dataset, monkeypatch):
    from cllm import records

    data_module(dataset).setup()
    calls = []
    original = records.sha256_of
    monkeypatch.setattr(records, "sha256_of", lambda path: calls.append(path) or original(path))
    data_module(dataset).setup()
    assert calls == []  # a restart hashes nothing
    shard = dataset / "shard-00000.jsonl"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    data_module(dataset).setup()
    assert [Path(p).name for p in calls] == ["shard-00000.jsonl"]  # only the touched shard


# -- 4. resume after the prompts changed ----------------------------------------------------------------------------


def test_resume_refuses_prompts_whose_content_changed(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"def f{i}(x):" for i in range(4)])
    argv = [*COLLECT, "--prompts", str(prompts), "--shard_size", "2", "--output", str(tmp_path / "out")]
    main(argv)
    (tmp_path / "out" / "shard-00001.jsonl").unlink()  # as if killed after the first shard
    write_prompts(prompts, [f"def g{i}(y):" for i in range(4)])  # same count, other content
    user_error(capsys, argv, "prompts")


# -- 5. the manifest against what the config asks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("prompts", "json-extract:train"), ("max_new_tokens", 64), ("chat_template", True), ("init", "repeat")],
)
def test_setup_refuses_a_folder_collected_with_other_settings(dataset, key, value):
    with pytest.raises(UserError) as error:
        data_module(dataset, **{key: value}).setup()
    message = str(error.value)
    assert f"data.init_args.{key}" in message and repr(value) in message and str(DATA.get(key, "context")) in message


def test_setup_refuses_another_collection_model(dataset):
    with pytest.raises(UserError, match=r"data.init_args.model"):
        data_module(dataset, model="tiny:seed=3").setup()


def test_setup_refuses_a_model_folder_whose_weights_changed(tmp_path):
    from cllm.models import build_tiny

    for seed in (0, 3):  # same tokenizer and shapes, other weights: only the fingerprint tells them apart
        model, tokenizer = build_tiny(f"tiny:seed={seed}")
        model.save_pretrained(tmp_path / "model")
        tokenizer.save_pretrained(tmp_path / "model")
        if seed == 0:
            argv = [str(tmp_path / "model") if arg == "tiny" else arg for arg in COLLECT]
            main([*argv, "--prompts", "stdlib-code:train", "--limit", "2", "--output", str(tmp_path / "data")])
            data_module(tmp_path / "data", model=str(tmp_path / "model"), prompt_limit=2).setup()  # unchanged: fine
    with pytest.raises(UserError, match="the weights changed since collection"):
        data_module(tmp_path / "data", model=str(tmp_path / "model"), prompt_limit=2).setup()


def test_weights_fingerprint_reads_what_model_fingerprint_hashes(tmp_path):
    from cllm.fingerprints import model_fingerprint, weights_fingerprint
    from cllm.models import build_tiny, load_model

    model, tokenizer = build_tiny("tiny:seed=2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = model_fingerprint(load_model(str(tmp_path), dtype="bfloat16")[0])
    assert weights_fingerprint(str(tmp_path)) == loaded == model_fingerprint(model)


# -- 6. the importer -----------------------------------------------------------------------------------------------


def official_entry(ids: list[int], labels: list[int] | None = None) -> dict:
    entry = {
        "data_id": "data_0",
        "jacobian_itr_id": "itr_0",
        "prompt_ids_len": [3],
        "prompt_ids": [[5, 6, 7]],
        "answer_trajectory_ids": [[ids], [ids]],
    }
    return entry | ({"labels_ids": [labels]} if labels else {})


def run_import(tmp_path, entries: list[dict]) -> list[str]:
    (tmp_path / "official.json").write_text(json.dumps(entries))
    return ["trajectories", "--model", "tiny", "--import_official", str(tmp_path / "official.json"), "--output"]


def test_import_refuses_a_folder_with_other_files(tmp_path, capsys, collected):
    argv = run_import(tmp_path, [official_entry([8, 9, 10, 11])])
    (tmp_path / "out").mkdir()
    shutil.copy(collected / "shard-00000.jsonl", tmp_path / "out" / "shard-00009.jsonl")
    user_error(capsys, [*argv, str(tmp_path / "out")], "not empty")


def test_import_refuses_token_ids_beyond_the_vocabulary(tmp_path, capsys):
    argv = run_import(tmp_path, [official_entry([8, 9, 10, 99999])])
    user_error(capsys, [*argv, str(tmp_path / "out")], "vocabulary")


def test_setup_refuses_token_ids_beyond_the_vocabulary(dataset):
    shard = dataset / "shard-00000.jsonl"
    text = re.sub(r'"states":\[\[(\d+)', '"states":[[99999', shard.read_text(), count=1)
    shard.write_text(text)
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"][0].pop("sha256")  # past the checksum: the id check itself
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"shard-00000.jsonl:1: .*99999.*vocabulary"):
        data_module(dataset).setup()


def test_import_counts_labels_that_do_not_start_with_the_prompt(tmp_path, capsys):
    entries = [official_entry([8, 9, 10, 11], labels=[1, 2, 3, 20, 21]), official_entry([8, 9, 10, 11])]
    entries[1]["data_id"] = "data_1"
    main([*run_import(tmp_path, entries), str(tmp_path / "out")])
    assert "1 labels_ids do not start with the prompt" in capsys.readouterr().out


# -- 7. --ckpt_path last -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_then_ckpt_path_last_resumes(tmp_path, collected):
    (tmp_path / "data").mkdir()
    shutil.copytree(collected, tmp_path / "data" / "tiny-trajectories")
    argv = ["fit", "--config", "tiny.yaml", "--trainer.max_steps=60", "--trainer.limit_val_batches=0"]
    argv += [f"--data.init_args.{k}={v}" for k, v in (("prompt_limit", 4), ("max_new_tokens", 8))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cllm", *argv]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
        last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
        for _ in range(600):
            if last.exists() or first.poll() is not None:
                break
            subprocess.run(["sleep", "0.2"])
        first.kill()
        first.wait()
    assert last.exists(), (tmp_path / "first.log").read_text()[-3000:]
    import torch

    saved = torch.load(last, weights_only=True)["global_step"]
    done = subprocess.run(
        [*command, "--ckpt_path", "last"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in done.stderr + done.stdout
    assert torch.load(last, weights_only=True)["global_step"] > saved


# -- 8. a failed run does not block the corrected rerun ------------------------------------------------------------


def test_a_failed_collection_leaves_nothing_that_blocks_the_rerun(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["def f(x):", ""])
    argv = [*COLLECT, "--prompts", str(prompts), "--output", str(tmp_path / "out")]
    user_error(capsys, argv, "empty")
    write_prompts(prompts, ["def f(x):", "def g(y):"])
    main(argv)
    assert "records from 2 prompts" in capsys.readouterr().out


# -- 9 and 10. one line, exit 2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--n", "0"], "n"),
        (["--shard_size", "0"], "shard_size"),
        (["--batch_size", "0"], "batch_size"),
        (["--max_new_tokens", "0"], "max_new_tokens"),
        (["--init", "bogus"], "bogus"),
    ],
)
def test_collection_settings_are_checked_before_anything_is_written(tmp_path, capsys, extra, phrase):
    out = tmp_path / "out"
    argv = [*COLLECT, "--prompts", "stdlib-code:train", "--limit", "2", "--output", str(out), *extra]
    user_error(capsys, argv, phrase)
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (json.dumps({"prompt": ""}) + "\n", "empty"),
        (b'{"prompt": "\xff\xfe"}\n', "UTF-8"),
        ("".join(json.dumps({"id": "same", "prompt": p}) + "\n" for p in ("a", "b")), "same"),
    ],
    ids=["empty prompt", "invalid UTF-8", "duplicate ids"],
)
def test_bad_prompt_files(tmp_path, capsys, content, phrase):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    user_error(capsys, [*COLLECT, "--init", "repeat", "--prompts", str(path), "--output", str(out)], phrase)
    assert not out.exists()


def mount_tmpfs(path: Path, options: str) -> Path:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    return path


@pytest.mark.parametrize("options", ["ro", "size=8k"], ids=["read-only", "full"])
def test_an_unwritable_output_folder(tmp_path, capsys, options):
    out = mount_tmpfs(tmp_path / "out", options)
    try:
        user_error(capsys, [*COLLECT, "--prompts", "stdlib-code:train", "--limit", "8", "--output", str(out)], str(out))
    finally:
        subprocess.run(["umount", str(out)], check=False)


DECODE = ["--model", "tiny", "--n", "4", "--no-chat-template"]


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["bench", *DECODE, "--prompts", "stdlib-code:test", "--limit", "1", "--max-new-tokens", "0"], "max"),
        (["generate", *DECODE, "--prompt", "def f(x):", "--max-new-tokens", "-1"], "max"),
        (["generate", *DECODE, "--prompt", "def f(x):", "--init", "bogus"], "bogus"),
        (["generate", *DECODE, "--prompt", "def f(x):", "--device", "cuda"], "cuda"),
        (["generate", "--model", "./models/smollm2-135mm", "--prompt", "hi"], "smollm2-135mm"),
    ],
    ids=["bench max-new-tokens 0", "generate negative", "init bogus", "cuda on CPU", "mistyped model path"],
)
def test_decoding_commands_refuse_bad_flags(capsys, argv, phrase):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    user_error(capsys, argv, phrase)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, collected) -> Path:
    folder = tmp_path_factory.mktemp("fit")
    (folder / "data").mkdir()
    shutil.copytree(collected, folder / "data" / "tiny-trajectories")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main([*tiny_fit(), "--trainer.max_steps=1"])
    return folder / "runs" / "tiny" / "checkpoints" / "last.ckpt"


def tiny_fit() -> list[str]:
    overrides = [f"--data.init_args.{k}={v}" for k, v in (("prompt_limit", 4), ("max_new_tokens", 8))]
    return ["fit", "--config", "tiny.yaml", "--trainer.limit_val_batches=0", *overrides]


# seeded random bytes that make torch's weights-only unpickler raise IndexError, KeyError and UnicodeDecodeError
# (most random bytes raise UnpicklingError; these three failed ~9% of unseeded runs before every error was one line)
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "seed 2", "seed 20", "seed 195"])
def test_a_corrupt_checkpoint_file(checkpoint, tmp_path, capsys, damage, monkeypatch):
    bad = tmp_path / "bad.ckpt"
    data = checkpoint.read_bytes()
    if damage.startswith("seed"):
        data = random.Random(int(damage.split()[1])).randbytes(4096)
    bad.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else os.urandom(4096) if damage == "random bytes" else data
    )
    user_error(capsys, ["export", "--ckpt", str(bad), "--output", str(tmp_path / "out")], "bad.ckpt")
    monkeypatch.chdir(checkpoint.parents[3])
    user_error(capsys, [*tiny_fit(), "--trainer.max_steps=1", f"--ckpt_path={bad}"], "bad.ckpt")


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("--data.init_args.n=32", "n"),
        ("--model.init_args.ar_weight=-1", "ar_weight"),
        ("--trainer.max_stepz=1", "max_stepz"),
    ],
    ids=["n above max_new_tokens", "negative ar_weight", "override typo"],
)
def test_fit_refuses_bad_settings_in_one_line(checkpoint, capsys, override, phrase, monkeypatch):
    monkeypatch.chdir(checkpoint.parents[3])
    user_error(capsys, [*tiny_fit(), "--trainer.max_steps=1", override], phrase)


def test_the_data_modules_own_collection_takes_a_shard_size(tmp_path):
    module = data_module(tmp_path / "data", collect_shard_size=1)
    module.prepare_data()
    assert len(json.loads((tmp_path / "data" / "manifest.json").read_text())["shards"]) == 4

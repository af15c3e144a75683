"""Reliability probe cases, bad input (items 9-10): one clear `cllm CMD: error:` line instead of a traceback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from probe_harness import (
    CACHE,
    OK,
    TINY_FIT,
    Outcome,
    case,
    checkpoint_file,
    cli,
    data_fit,
    dataset,
    sharded_checkpoint,
    tiny_fit_data,
    write_prompts,
)

# -- one clear line instead of a traceback (items 9-10) -----------------------------------------------------------

COLLECT = ["trajectories", "--model", "tiny", "--n", "4", "--max_new_tokens", "8", "--chat_template", "false"]


def collect_case(item: str, name: str, prompts: list[str] | bytes | None, extra: list[str], phrase: str = ""):
    @case(item, name)
    def _(work):
        source = "stdlib-code:train"
        if isinstance(prompts, bytes):
            (work / "p.jsonl").write_bytes(prompts)
            source = "p.jsonl"
        elif prompts is not None:
            write_prompts(work / "p.jsonl", prompts)
            source = "p.jsonl"
        return cli(work, [*COLLECT, "--prompts", source, "--limit", "4", "--output", "out", *extra], contains=phrase)


collect_case("9", "trajectories: an empty prompt (--init repeat)", ["def f(x):", ""], ["--init", "repeat"], "empty")
collect_case("9", "trajectories: invalid UTF-8 in the prompt file", b'{"prompt": "\xff\xfe"}\n', [], "UTF-8")
collect_case("9", "trajectories: --n 0", None, ["--n", "0"], "n")
collect_case("9", "trajectories: --shard_size 0", None, ["--shard_size", "0"], "shard_size")
collect_case("9", "trajectories: --batch_size 0", None, ["--batch_size", "0"], "batch_size")


@case("10", "trajectories: duplicate prompt ids in the prompt file")
def _(work):
    write_prompts(work / "p.jsonl", ["def f(x):", "def g(y):"], ids=["same", "same"])
    return cli(work, [*COLLECT, "--prompts", "p.jsonl", "--output", "out"], contains="same")


def mounted(work: Path, options: str) -> Path:
    """A tmpfs mounted at work/out with `options` (ro, size=...); root only."""
    out = work / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(out)], check=True)
    CACHE.setdefault("mounts", []).append(out)
    return out


@case("9", "trajectories: a read-only output folder")
def _(work):
    mounted(work, "ro")
    return cli(work, [*COLLECT, "--prompts", "stdlib-code:train", "--limit", "2", "--output", "out"], contains="out")


@case("9", "trajectories: a full output folder")
def _(work):
    mounted(work, "size=8k")
    return cli(work, [*COLLECT, "--prompts", "stdlib-code:train", "--limit", "8", "--output", "out"], contains="out")


DECODE = ["--model", "tiny", "--n", "4", "--no-chat-template"]


@case("9", "bench --max-new-tokens 0")
def _(work):
    return cli(work, ["bench", *DECODE, "--prompts", "stdlib-code:test", "--limit", "1", "--max-new-tokens", "0"])


@case("9", "generate --device cuda on a CPU build")
def _(work):
    import torch

    if torch.cuda.is_available():
        return Outcome("cllm generate --device cuda", 0, "(skipped: this machine has CUDA)", True)
    return cli(work, ["generate", *DECODE, "--prompt", "def f(x):", "--device", "cuda"], contains="cuda")


@case("9", "generate --init bogus")
def _(work):
    return cli(work, ["generate", *DECODE, "--prompt", "def f(x):", "--init", "bogus"], contains="bogus")


@case("10", "generate --max-new-tokens -1")
def _(work):
    return cli(work, ["generate", *DECODE, "--prompt", "def f(x):", "--max-new-tokens", "-1"], contains="max")


@case("10", "generate: a mistyped local model path (fails at once, no hub retries)")
def _(work):
    outcome = cli(work, ["generate", "--model", "./models/smollm2-135mm", "--prompt", "hi"], contains="not found")
    outcome.ok = outcome.ok and float(outcome.note.split()[0]) < 30
    return outcome


@case("9", "export: a corrupt .ckpt")
def _(work):
    (work / "model.ckpt").write_bytes(os.urandom(4096))
    return cli(work, ["export", "--ckpt", "model.ckpt", "--output", "out"], contains="model.ckpt")


@case("9", "export: a truncated .ckpt")
def _(work):
    path = checkpoint_file(work)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cli(work, ["export", "--ckpt", "model.ckpt", "--output", "out"], contains="model.ckpt")


@case("9", "fit --ckpt_path a truncated .ckpt")
def _(work):
    path = checkpoint_file(work)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    tiny_fit_data(work)
    return cli(work, [*TINY_FIT, "--ckpt_path", "model.ckpt"], contains="model.ckpt")


@case("9", "export: a sharded folder with its shard deleted")
def _(work):
    folder = sharded_checkpoint(work / "ck")
    for shard in folder.glob("*.distcp"):
        shard.unlink()
    return cli(work, ["export", "--ckpt", "ck", "--output", "out"], contains="ck")


@case("9", "fit: n larger than max_new_tokens")
def _(work):
    (work / "data").mkdir()
    return cli(work, [*TINY_FIT, "--data.init_args.n=32", "--data.init_args.max_length=512"], contains="n")


@case("10", "fit: a typo in an override (short message)")
def _(work):
    outcome = cli(work, ["fit", "--config", "tiny.yaml", "--trainer.max_stepz=1"], contains="max_stepz")
    return outcome


@case("10", "fit: a negative ar_weight")
def _(work):
    tiny_fit_data(work)
    return cli(work, [*TINY_FIT, "--model.init_args.ar_weight=-1"], contains="ar_weight")


@case("10", "fit: the data module's own collection resumes per shard (collect_shard_size)")
def _(work):
    return cli(work, ["fit", "--config", "tiny.yaml", "--data.init_args.collect_shard_size=2", "--print_config"], OK)


@case("-", "trajectories: a missing prompt file")
def _(work):
    return cli(work, [*COLLECT, "--prompts", "missing.jsonl", "--output", "out"], contains="missing.jsonl")


@case("-", "fit on a dataset made with another tokenizer")
def _(work):
    folder = dataset(work)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizer_fingerprint"] = "0123456789abcdef"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return cli(work, data_fit(work), contains="tokenizer")

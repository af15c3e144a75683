"""Meta-device init for FSDP2 (2 CPU processes, gloo) against a plain load: same parameters, losses and export."""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_fsdp import fit, run

from cllm.models import build_tiny

pytestmark = pytest.mark.slow

COMPARE_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from cllm.models import load_model, shard_fsdp2
from cllm.sharded_load import load_sharded

import cllm.sharded_load as sharded_load
import transformers

dist.init_process_group("gloo")
world = dist.get_world_size()
# Spies on the path claimed: the model is built on meta, and no whole-model load happens on the way (a silent
# fallback to a plain load would pass every comparison below).
built, plain_loads = [], []
build_on_meta = sharded_load.build_on_meta
sharded_load.build_on_meta = lambda *a, **k: built.append(1) or build_on_meta(*a, **k)
from_pretrained = transformers.AutoModelForCausalLM.from_pretrained
transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: plain_loads.append(1) or from_pretrained(*a, **k)
meta = load_sharded(sys.argv[1], init_device_mesh("cpu", (world,)))
assert built == [1] and plain_loads == [], (built, plain_loads)
assert all(p.device.type == "cpu" for p in meta.parameters())
transformers.AutoModelForCausalLM.from_pretrained = from_pretrained
plain, _ = load_model(sys.argv[1])
shard_fsdp2(plain, init_device_mesh("cpu", (world,)))
local = [p.to_local().numel() for p in meta.parameters()]
assert sum(local) < sum(p.numel() for p in meta.parameters()), "each rank holds a part only"
for (name, a), (_, b) in zip(meta.named_parameters(), plain.named_parameters()):
    assert torch.equal(a.full_tensor(), b.full_tensor()), name
for (name, a), (_, b) in zip(meta.named_buffers(), plain.named_buffers()):
    assert torch.equal(a, b), name
ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    assert torch.equal(meta(input_ids=ids).logits, plain(input_ids=ids).logits)
print("same")
# Clean ending: every rank past its last collective, then the group gone, then out without the interpreter's
# teardown, where the DTensors' device mesh still holds gloo's process group and its worker threads can abort the
# process after the work is done ("terminate called without an active exception": a CI flake, rank 0, after "same").
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder (safetensors), as `smollm2-135m`'s GGUF cache is."""
    path = tmp_path_factory.mktemp("tiny-folder") / "model"
    model, tokenizer = build_tiny("tiny:seed=5")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    """The same with a tied LM head (as SmolLM2): the checkpoint holds the one matrix once."""
    path = tmp_path_factory.mktemp("tied-folder") / "model"
    model, tokenizer = build_tiny("tiny:seed=6")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("which", ["folder", "tied_folder"])
def test_meta_load_gives_the_parameters_of_a_plain_load(which, request, tmp_path):
    (tmp_path / "compare.py").write_text(textwrap.dedent(COMPARE_SCRIPT))
    done = run(["compare.py", str(request.getfixturevalue(which))], cwd=tmp_path, processes=2)
    assert done.stdout.count("same") == 2


def test_meta_init_fit_matches_plain_fit_and_exports(folder, tmp_path):
    model = ["--model.init_args.model", str(folder)]
    meta = fit(tmp_path, "meta", 2, max_steps=2, extra=model)
    plain = fit(tmp_path, "plain", 2, max_steps=2, extra=[*model, "--model.init_args.meta_init", "false"])
    assert sorted(meta) == sorted(plain) == [0, 1]
    for step in meta:
        assert meta[step] == pytest.approx(plain[step], rel=1e-6)

    from transformers import AutoModelForCausalLM

    outputs = []
    for name in ("meta", "plain"):
        exported = tmp_path / f"{name}-export"
        checkpoint = tmp_path / name / "ckpt" / "epoch=0-step=2.ckpt"
        run(["-m", "cllm", "export", "--ckpt", str(checkpoint), "--output", str(exported)], cwd=tmp_path, processes=1)
        loaded = AutoModelForCausalLM.from_pretrained(exported)
        prompt = torch.tensor([[1, 70, 71, 72, 73]])
        outputs.append(loaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist())
    assert outputs[0] == outputs[1]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "meta-export").state_dict()
    base = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # the export holds the trained weights

"""LoRA (`model.init_args.lora`, `cllm.lora`) on the tiny model, CPU, float64 where exactness matters: only adapters
train, the adapted model starts as the base, resume is bit-identical, the merged export equals the adapted model,
a checkpoint of another base is refused; 2-process FSDP2 equals 1 process (slow)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from fake_trajectories import FakeTrajectoryData
from lightning.pytorch.callbacks import ModelCheckpoint
from test_fsdp import fit
from torch.utils.data import default_collate
from trainers import quiet_trainer

from cllm.cli import main
from cllm.errors import UserError
from cllm.export import export
from cllm.lora import LoraSettings
from cllm.models import build_tiny, load_model
from cllm.module import CLLMModule

LORA = LoraSettings(rank=4, alpha=8.0)


def module(lora: LoraSettings | None = LORA, **kwargs) -> CLLMModule:
    built = CLLMModule(**{"model": "tiny", "dtype": "float64", "n": 4, "lr": 1e-2, "lora": lora, **kwargs})
    built.configure_model()
    return built


def batch(forcing: bool = False) -> dict:
    data = FakeTrajectoryData(rows=3, forcing=forcing)
    return data.collate_fn(data.records) if forcing else default_collate(data.records)


def adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("forcing", [False, True], ids=["cllm", "jacobi_forcing"])
def test_only_the_adapters_get_gradients(forcing):
    grads = []
    for checkpointing in (False, True):
        adapted = module(activation_checkpointing=checkpointing)
        with torch.no_grad():  # B != 0, so that A gets a gradient too
            for name, p in adapted.model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        adapted.compute_losses(batch(forcing))["loss"].backward()
        trained = {name for name, p in adapted.named_parameters() if p.grad is not None}
        assert trained == {name for name, p in adapted.named_parameters() if p.requires_grad}
        assert all("lora_" in name for name in trained) and len(trained) == 2 * 7 * 2  # A, B of 7 projections x 2
        grads.append({name: p.grad for name, p in adapted.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():  # activation checkpointing recomputes the same
        assert torch.count_nonzero(grad) > 0
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sliced", [True, False])
@pytest.mark.parametrize("forcing", [False, True], ids=["cllm", "jacobi_forcing"])
def test_lora_at_init_equals_the_base(forcing, sliced):
    rows = batch(forcing)
    base = module(lora=None, sliced_logits=sliced).compute_losses(rows)
    adapted = module(sliced_logits=sliced)
    for name, value in adapted.compute_losses(rows).items():
        torch.testing.assert_close(value, base[name], rtol=0, atol=0)  # B = 0: exactly the base
    assert all(torch.count_nonzero(p) == 0 for n, p in adapters(adapted.model).items() if "lora_B" in n)
    assert all(torch.count_nonzero(p) > 0 for n, p in adapters(adapted.model).items() if "lora_A" in n)


def test_adapter_init_is_one_seeded_draw():
    first, again, other = module(), module(), module(lora=LoraSettings(rank=4, alpha=8.0, seed=1))
    for name, value in adapters(first.model).items():
        assert torch.equal(value, adapters(again.model)[name])
    assert any(not torch.equal(v, adapters(other.model)[k]) for k, v in adapters(first.model).items())


def test_bad_target_modules_are_user_errors():
    with pytest.raises(UserError, match="target_modules.*the model's linear layers are named"):
        module(lora=LoraSettings(target_modules=["query"]))
    with pytest.raises(UserError, match="LM head and embeddings stay frozen"):
        LoraSettings(target_modules=["lm_head"])


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = outputs["loss"].item()


def train(tmp_path, steps: int, resume: str | None = None, **kwargs) -> tuple[CLLMModule, dict[int, float]]:
    """`steps` steps on 8 rows of 4 (2 steps an epoch), a checkpoint at each epoch's end in `tmp_path`."""
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    adapted = CLLMModule(model=kwargs.pop("model", "tiny"), dtype="float64", lr=1e-2, warmup_ratio=0.25, lora=LORA)
    trainer = quiet_trainer(max_steps=steps, callbacks=[recorder, checkpoints], enable_checkpointing=True, **kwargs)
    trainer.fit(adapted, FakeTrajectoryData(rows=8), ckpt_path=resume)
    return adapted, recorder.losses


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-straight")
    adapted, losses = train(folder, steps=4)
    return folder, adapted, losses


def test_checkpoint_holds_the_adapters_and_their_optimizer_state_only(straight):
    folder, adapted, _ = straight
    checkpoint = torch.load(folder / "epoch=1-step=4.ckpt", weights_only=True)
    names = set(adapters(adapted.model))
    assert set(checkpoint["state_dict"]) == {f"model.{name}" for name in names}
    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == len(names) and {"exp_avg", "exp_avg_sq"} <= set(optimizer["state"][0])
    assert checkpoint["cllm_lora"]["base_model"] == "tiny" and checkpoint["cllm_lora"]["settings"]["rank"] == 4
    base = build_tiny()[0]
    for name, p in adapted.model.named_parameters():  # the base did not move
        if "lora_" not in name:
            torch.testing.assert_close(p.float(), base.state_dict()[name.replace(".base_layer.", ".")], rtol=0, atol=0)


OVERLAY = """
trainer:
  callbacks:  # every epoch's checkpoint (2 steps an epoch here), `last.ckpt` beside them (cllm pins the folder)
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_top_k: -1, save_on_train_epoch_end: true}
"""
FIT = ["fit", "--config", "tiny.yaml", "--config", "overlay.yaml", "--trainer.limit_val_batches=0"]
FIT += ["--model.init_args.lora={rank: 4, alpha: 8}", "--model.init_args.dtype=float64", "--trainer.max_steps=4"]
FIT += ["--data.init_args.prompt_limit=4", "--data.init_args.max_new_tokens=8"]  # 6 training records


def cli_fit(folder, *extra: str) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """`cllm fit` of tiny.yaml with LoRA in `folder`: (train loss by step, the final checkpoint's weights)."""
    (folder / "overlay.yaml").write_text(OVERLAY)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main([*FIT, *extra])
    losses = {}
    for metrics in sorted((folder / "runs" / "tiny" / "logs").glob("version_*/metrics.csv")):
        with open(metrics) as handle:
            losses.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(handle) if r["train/loss"]})
    final = torch.load(folder / "runs" / "tiny" / "checkpoints" / "epoch=1-step=4.ckpt", weights_only=True)
    return losses, final["state_dict"]


def test_ckpt_path_last_resumes_bit_identically(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    losses, weights = cli_fit(straight)
    shutil.copytree(straight / "data", resumed / "data")
    checkpoints = resumed / "runs" / "tiny" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(straight / "runs" / "tiny" / "checkpoints" / "epoch=0-step=2.ckpt", checkpoints)
    (checkpoints / "last.ckpt").symlink_to("epoch=0-step=2.ckpt")  # as a run stopped at step 2 leaves it
    resumed_losses, resumed_weights = cli_fit(resumed, "--ckpt_path", "last")
    assert sorted(losses) == [0, 1, 2, 3] and sorted(resumed_losses) == [2, 3]
    for step, loss in resumed_losses.items():
        assert loss == losses[step], (step, loss, losses[step])  # bit for bit
    assert set(weights) == set(resumed_weights) and all("lora_" in name for name in weights)
    for name, value in weights.items():
        assert torch.equal(resumed_weights[name], value), name


def test_merged_export_equals_the_adapted_model(straight, tmp_path):
    from peft import PeftModel

    folder, adapted, _ = straight
    checkpoint = folder / "epoch=1-step=4.ckpt"
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted.model.eval()(input_ids=ids).logits
        merged, _ = load_model(str(export(checkpoint, tmp_path / "merged")), dtype="float64")
        assert not any("lora" in name for name in merged.state_dict())  # a plain Llama: every decoder takes it
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-10, atol=1e-10)
        adapter = export(checkpoint, tmp_path / "adapter", adapter=True)
        assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
        peft_model = PeftModel.from_pretrained(build_tiny()[0].double(), adapter).eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-12, atol=1e-12)


def test_checkpoint_of_another_base_is_refused(straight, tmp_path):
    folder, _, _ = straight
    checkpoint = folder / "epoch=0-step=2.ckpt"
    with pytest.raises(
        UserError, match=r"adapters for base model 'tiny' \(weights \w+\), but model.init_args.model"
    ) as e:
        train(tmp_path, steps=4, resume=str(checkpoint), model="tiny:seed=1")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="adapters for base model 'tiny'"):
        export(checkpoint, tmp_path / "out", model_spec="tiny:seed=1")
    full = CLLMModule(model="tiny", dtype="float64")
    with pytest.raises(UserError, match="holds LoRA adapters of 'tiny'.*lora is null"):
        quiet_trainer(max_steps=4).fit(full, FakeTrajectoryData(rows=8), ckpt_path=str(checkpoint))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_mixed_trains_the_adapters_only(dtype):
    adapted = CLLMModule(model="tiny", dtype=dtype, lr=1e-2, lora=LORA)
    quiet_trainer(max_steps=2, precision="bf16-mixed").fit(adapted, FakeTrajectoryData(rows=8))
    base = build_tiny()[0].to(getattr(torch, dtype)).state_dict()
    for name, p in adapted.model.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32  # adapters train in float32 on a bf16 base too
        else:
            assert p.dtype == getattr(torch, dtype) and torch.equal(p, base[name.replace(".base_layer.", ".")])
    assert any(torch.count_nonzero(p) for n, p in adapters(adapted.model).items() if "lora_B" in n)


@pytest.mark.slow
def test_two_process_fsdp_lora_equals_one_process(tmp_path):
    """1 process (plain load) against 2 processes (FSDP2, meta-device init of a tiny folder): losses and adapters;
    then a 2-process resume from the sharded checkpoint, and the refusal of that checkpoint on another base."""
    path = tmp_path / "base"
    model, tokenizer = build_tiny("tiny:seed=5")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    extra = [
        "--model.init_args.model",
        str(path),
        "--model.init_args.dtype=float64",
        "--model.init_args.lora={rank: 4}",
    ]
    single = fit(tmp_path, "single", 1, max_steps=4, extra=extra)
    sharded = fit(tmp_path, "sharded", 2, max_steps=4, extra=extra)
    assert sorted(single) == sorted(sharded) == [0, 1, 2, 3]
    for step in single:
        assert sharded[step] == pytest.approx(single[step], rel=1e-10), step
    assert len({round(v, 6) for v in single.values()}) > 1

    from cllm.safe_checkpoint import check_adapters, load_sharded, read_metadata

    weights = torch.load(tmp_path / "single" / "ckpt" / "epoch=1-step=4.ckpt", weights_only=True)["state_dict"]
    folder = tmp_path / "sharded" / "ckpt" / "epoch=1-step=4.ckpt"
    assert folder.is_dir() and all("lora_" in name for name in weights)
    stored = [key for key in read_metadata(folder).state_dict_metadata if key.startswith("state_dict.")]
    assert stored and all("lora_" in key for key in stored)  # the shards hold the adapters, not the base
    state = {"state_dict": {name: torch.zeros_like(value) for name, value in weights.items()}}
    load_sharded(state, folder)
    for name, value in weights.items():
        torch.testing.assert_close(state["state_dict"][name], value, rtol=1e-10, atol=1e-12)

    merged = [
        export(ckpt, tmp_path / f"merged-{i}")
        for i, ckpt in enumerate([folder, tmp_path / "single" / "ckpt" / "epoch=1-step=4.ckpt"])
    ]
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the sharded folder exports (merged) to the model the single-process checkpoint does
        logits = [load_model(str(out), dtype="float64")[0](input_ids=ids).logits for out in merged]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-9, atol=1e-9)

    middle = str(tmp_path / "sharded" / "ckpt" / "epoch=0-step=2.ckpt")
    resumed = fit(tmp_path, "resumed", 2, max_steps=4, extra=[*extra, "--ckpt_path", middle])
    for step, loss in zip((2, 3), [resumed[k] for k in sorted(resumed)]):
        assert loss == pytest.approx(single[step], rel=1e-10), step

    # a run on another base refuses the sharded folder before DCP reads it (what `cllm fit --ckpt_path` runs first)
    other = CLLMModule(model="tiny:seed=6", dtype="float64", lora=LoraSettings(rank=4))
    other.configure_model()
    with pytest.raises(UserError, match="holds adapters for base model"):
        check_adapters(SimpleNamespace(lightning_module=other), Path(middle))


def test_lora_memory_benchmark_at_a_tiny_shape(tmp_path, capsys, monkeypatch):
    """Two variants measured in this process (`--variant`, what each subprocess of a run does), then the table and
    the 7B extrapolation rendered from them (`--rerender`)."""
    spec = importlib.util.spec_from_file_location(
        "lora_memory", Path(__file__).parents[1] / "benchmarks/lora_memory.py"
    )
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lora_memory", benchmark)  # its dataclass looks its module up there
    spec.loader.exec_module(benchmark)
    rows = {}
    for variant in ("full", "lora-r4"):
        benchmark.main(["--variant", variant, "--model", "tiny", "--ranks", "[4]", "--repeats", "1"])
        rows[variant] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows["lora-r4"]["trained_parameters"] < rows["full"]["trained_parameters"] == rows["full"]["parameters"]
    assert rows["lora-r4"]["counted_bytes"]["optimizer"] < rows["full"]["counted_bytes"]["optimizer"]
    # (the peak RSS of a tiny model inside pytest's process says little: only that it is measured)
    assert all(isinstance(row["measured_peak_mib"], float) and row["seconds_per_step"] > 0 for row in rows.values())
    out = tmp_path / "memory.json"
    out.write_text(json.dumps({"rows": rows, "settings": {}, "machine": {}}))
    benchmark.main(["--rerender", "--output", str(out)])
    seven = json.loads(out.read_text())["extrapolation"]["rows"]
    full, lora = (sum(seven[name][0]["gib"].values()) for name in ("full", "lora-r4"))
    assert lora < full and seven["full"][0]["trained_parameters"] == benchmark.LLAMA2_7B["parameters"]
    assert "| lora-r4 |" in (tmp_path / "memory.md").read_text()

"""Sharded checkpoints (torch.distributed.checkpoint) load without running code planted in them.

The folder is written by DCP itself, as Lightning's ModelParallelStrategy writes it (model and optimizer state, a
`meta.pt`). A payload's `__reduce__` calls `exec`, which writes a marker file: each test first shows that the stock
loader runs it, then that cllm refuses the folder in one line (exit 2) and the marker never appears.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from cllm.cli import main
from cllm.errors import UserError
from cllm.models import build_tiny
from cllm.safe_checkpoint import check_sharded_checkpoint, guard_checkpoint_loading, read_metadata


class Payload:
    """Unpickling this writes `marker`: what a hostile checkpoint would do (with `os.system` instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def write_sharded(folder: Path, extra: dict | None = None) -> torch.nn.Module:
    model, _ = build_tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    state = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "optimizer_0": optimizer}
    state["optimizer_0"] = optimizer.state_dict()
    dcp.save({**state, **(extra or {})}, checkpoint_id=folder, no_dist=True)
    torch.save({"hyper_parameters": {"model": "tiny", "dtype": "float32"}, "global_step": 1}, folder / "meta.pt")
    return model


@pytest.fixture
def sharded(tmp_path):
    folder = tmp_path / "epoch=0-step=1.ckpt"
    return folder, write_sharded(folder)


def plant_in_metadata(folder: Path, marker: Path) -> None:
    metadata = FileSystemReader(folder).read_metadata()
    metadata.planner_data = {"state_dict": Payload(marker)}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def assert_stock_loader_runs_it(folder: Path, marker: Path) -> None:
    state = {"optimizer_0": {"param_groups": [{"lr": 0.0}]}}
    try:
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    except BaseException:  # noqa: B036 -- the payload ran before anything failed
        pass
    assert marker.read_text() == "ran", "the planted payload is not real"
    marker.unlink()


def run_cli(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # after Lightning's INFO lines, in fit
    assert last.startswith(f"cllm {argv[0]}: error: "), err
    return last


def test_a_clean_sharded_checkpoint_exports_with_its_weights(sharded, tmp_path, capsys):
    folder, model = sharded
    main(["export", "--ckpt", str(folder), "--output", str(tmp_path / "out")])
    assert "exported" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["index", "optimizer value"])
def test_export_refuses_a_planted_payload(where, tmp_path, capsys):
    folder, marker = tmp_path / "ckpt", tmp_path / "marker"
    if where == "index":
        write_sharded(folder)
        plant_in_metadata(folder, marker)
    else:  # a non-tensor value: DCP's default planner loads it with weights_only=False
        write_sharded(folder, extra={"optimizer_0": {"param_groups": [{"lr": Payload(marker)}]}})
    assert_stock_loader_runs_it(folder, marker)

    err = run_cli(capsys, ["export", "--ckpt", str(folder), "--output", str(tmp_path / "out")])
    assert "refused" in err and str(folder) in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_broken_sharded_folders_fail_in_one_line(sharded, tmp_path, capsys):
    folder, _ = sharded
    (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:100])
    err = run_cli(capsys, ["export", "--ckpt", str(folder), "--output", str(tmp_path / "out")])
    assert "refused to load this checkpoint index" in err
    (folder / ".metadata").unlink()
    err = run_cli(capsys, ["export", "--ckpt", str(folder), "--output", str(tmp_path / "out")])
    assert "not a sharded checkpoint (no .metadata)" in err


def test_truncated_shard_fails_in_one_line(sharded, tmp_path, capsys):
    folder, _ = sharded
    (shard,) = folder.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:1000])
    err = run_cli(capsys, ["export", "--ckpt", str(folder), "--output", str(tmp_path / "out")])
    assert str(folder) in err and ("cannot read" in err or "corrupted" in err)


def test_the_index_allow_list_reads_what_dcp_writes(sharded):
    folder, _ = sharded
    assert (
        read_metadata(folder).state_dict_metadata.keys()
        == FileSystemReader(folder).read_metadata().state_dict_metadata.keys()
    )
    check_sharded_checkpoint(folder)


def test_the_strategy_guard_runs_before_the_stock_loader(tmp_path):
    folder, marker = tmp_path / "ckpt", tmp_path / "marker"
    write_sharded(folder, extra={"optimizer_0": {"param_groups": [{"lr": Payload(marker)}]}})

    class Strategy:  # what Lightning calls: strategy.load_checkpoint(path) -> the stock DCP loader
        def load_checkpoint(self, path, weights_only=None):
            assert_stock_loader_runs_it(Path(path), marker)

    strategy = Strategy()
    guard_checkpoint_loading(strategy)
    with pytest.raises(UserError, match="refused the value"):
        strategy.load_checkpoint(folder)
    assert not marker.exists()
    with pytest.raises(UserError, match="checkpoint not found"):
        strategy.load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.slow  # collects the tiny trajectories first (~15 s)
def test_fit_refuses_to_resume_from_a_planted_folder(tmp_path, capsys, monkeypatch):
    folder, marker = tmp_path / "ckpt", tmp_path / "marker"
    write_sharded(folder)
    plant_in_metadata(folder, marker)
    monkeypatch.chdir(tmp_path)
    err = run_cli(capsys, ["fit", "--config", "tiny.yaml", "--trainer.max_steps=1", f"--ckpt_path={folder}"])
    assert "refused to load this checkpoint index" in err
    assert not marker.exists()

"""`cllm fit --config tiny.yaml` end to end (collect, train, checkpoint), then `cllm export` to a HF folder."""

from __future__ import annotations

import glob

import pytest
import torch
from transformers import AutoModelForCausalLM

from cllm.cli import main
from cllm.errors import UserError
from cllm.export import export
from cllm.export import main as export_main
from cllm.fingerprints import tokenizer_fingerprint
from cllm.models import build_tiny, load_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main(["fit", "--config", "tiny.yaml", "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    # validation is off: the checkpoint of the run's end (cllm.lightning_cli.pin_checkpoint_folders)
    (checkpoint,) = glob.glob(str(folder / "runs" / "tiny" / "checkpoints" / "epoch=*.ckpt"))
    return folder, checkpoint


def test_tiny_fit_exports_to_a_folder_transformers_loads(tiny_checkpoint, capsys):
    folder, checkpoint = tiny_checkpoint
    out = folder / "exported"
    export_main(["--ckpt", checkpoint, "--output", str(out)])
    assert "exported" in capsys.readouterr().out

    trained = torch.load(checkpoint, weights_only=True)["state_dict"]
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained["model." + name], rtol=0, atol=0)
    base, _ = build_tiny()
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)  # the trained weights, not the base ones

    reloaded, tokenizer = load_model(str(out))  # what `cllm generate/bench --model DIR` do
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(build_tiny()[1])
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_export_refuses_bad_input(tiny_checkpoint, tmp_path):
    folder, checkpoint = tiny_checkpoint
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        export_main(["--ckpt", checkpoint, "--output", str(tmp_path / "taken")])
    with pytest.raises(UserError, match="not a sharded Lightning checkpoint"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="checkpoint not found"):
        export(tmp_path / "missing.ckpt", tmp_path / "out")

"""`python -m cllm export --ckpt PATH --output DIR`: a Lightning checkpoint of `CLLMModule` -> Hugging Face folder.

The checkpoint is either one file (single process, or `save_distributed_checkpoint=False`) or the sharded folder
that `ModelParallelStrategy` writes (`*.distcp` shards + `meta.pt`). Either way the model spec saved in the
checkpoint's hyperparameters (or `--model`) builds the architecture and tokenizer; the trained weights replace its
weights; the folder gets safetensors + config + tokenizer and loads with `AutoModelForCausalLM.from_pretrained` and
`cllm.models.load_model(DIR)`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cllm.arguments import parse_settings
from cllm.errors import UserError
from cllm.models import load_model, resolve_dtype
from cllm.safe_checkpoint import UNREADABLE, check_sharded_checkpoint, exception_line, load_sharded

META_FILE = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint folder
PREFIX = "model."  # CLLMModule keeps the HF model as `self.model`


def read_metadata(ckpt: Path) -> dict:
    """Hyperparameters, global step etc. of a checkpoint (file or sharded folder), without the tensors' bulk."""
    if ckpt.is_dir():
        if not (ckpt / META_FILE).is_file():
            raise UserError(f"{ckpt} is a folder but not a sharded Lightning checkpoint (no {META_FILE})")
        check_sharded_checkpoint(ckpt)  # before the model is built: a refused folder fails in a second
        return torch.load(ckpt / META_FILE, weights_only=True, map_location="cpu")
    if not ckpt.is_file():
        raise UserError(f"checkpoint not found: {ckpt}")
    try:
        return torch.load(ckpt, weights_only=True, map_location="cpu", mmap=True)
    except Exception as err:  # truncated zip, not a checkpoint, a pickle with forbidden globals
        raise UserError(f"{ckpt}: {UNREADABLE}: {exception_line(err)}") from None


def load_trained_weights(model: torch.nn.Module, ckpt: Path, metadata: dict) -> None:
    """Copy the checkpoint's `model.*` weights into `model` (in place; every weight must be present)."""
    if ckpt.is_dir():
        # Load straight into the model's own tensors: only the weights are read, never the optimizer state; the
        # folder's pickled index goes through an allow-list (cllm.safe_checkpoint), so it cannot run code.
        load_sharded({"state_dict": {PREFIX + name: tensor for name, tensor in model.state_dict().items()}}, ckpt)
        return
    state_dict = metadata.get("state_dict")
    if not state_dict:
        raise UserError(f"{ckpt}: no state_dict in this checkpoint")
    weights = {name[len(PREFIX) :]: tensor for name, tensor in state_dict.items() if name.startswith(PREFIX)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not _is_tied(model, name)]
    if missing or unexpected:
        raise UserError(f"{ckpt}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name == "lm_head.weight"


def export(ckpt: Path, output: Path, *, model_spec: str | None = None, dtype: str | None = None) -> Path:
    """Write the HF folder `output` (atomically) and return it."""
    metadata = read_metadata(ckpt)
    hparams = dict(metadata.get("hyper_parameters") or {})
    spec = model_spec or hparams.get("model")
    if not spec:
        raise UserError(f"{ckpt}: no model spec in the checkpoint's hyperparameters; pass --model SPEC")
    master = hparams.get("dtype", "float32")
    model, tokenizer = load_model(spec, dtype="float32" if master == "auto" else master, attn_implementation="sdpa")
    load_trained_weights(model, ckpt, metadata)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
    model.config.use_cache = True

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        provenance = {"checkpoint": str(ckpt), "base_model": spec, "global_step": metadata.get("global_step")}
        (staging / "cllm_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)  # atomic: a reader never sees a half-written folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


@dataclass(kw_only=True)
class ExportSettings:
    """`cllm export`: a Lightning checkpoint -> a Hugging Face model folder.

    Args:
        ckpt: Lightning checkpoint: .ckpt file or sharded folder.
        output: Hugging Face folder to write.
        model: base model spec (default: the one saved in the checkpoint).
        dtype: dtype of the saved weights (default: the training dtype).
        overwrite: replace an existing output folder.
    """

    ckpt: str
    output: str
    model: str | None = None
    dtype: str | None = None
    overwrite: bool = False


def main(argv: list[str]) -> None:
    args = parse_settings(ExportSettings, argv, "cllm export", __doc__.splitlines()[0])
    ckpt, output = Path(args.ckpt), Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"output {output} exists; pass --overwrite to replace it")
    out = export(ckpt, output, model_spec=args.model, dtype=args.dtype)
    print(f"exported {ckpt} -> {out} (load with AutoModelForCausalLM.from_pretrained or --model {out})")

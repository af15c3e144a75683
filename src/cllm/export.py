"""`python -m cllm export --ckpt PATH --output DIR`: a Lightning checkpoint of `CLLMModule` -> Hugging Face folder.

The checkpoint is either one file (single process, or `save_distributed_checkpoint=False`) or the sharded folder
that `ModelParallelStrategy` writes (`*.distcp` shards + `meta.pt`). Either way the model spec saved in the
checkpoint's hyperparameters (or `--model`) builds the architecture and tokenizer; the trained weights replace its
weights; the folder gets safetensors + config + tokenizer and loads with `AutoModelForCausalLM.from_pretrained` and
`cllm.models.load_model(DIR)`.

A LoRA checkpoint (adapters only, `model.init_args.lora`) is checked against the base it names (weight fingerprint)
and exported merged, W + (alpha / rank) B A in float32 (then `--dtype`): a plain model every decoder, bench and serve
load unchanged. `--adapter` writes the adapter alone instead (PEFT's adapter_config.json + adapter_model.safetensors,
loadable with `peft.PeftModel.from_pretrained(base, DIR)`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cllm import lora
from cllm.arguments import parse_settings
from cllm.errors import UserError
from cllm.fingerprints import model_fingerprint
from cllm.models import load_model, local_folder, resolve_dtype
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


def load_trained_weights(model: torch.nn.Module, ckpt: Path, metadata: dict, adapters_only: bool = False) -> None:
    """Copy the checkpoint's `model.*` weights into `model` (in place; every weight, or every LoRA adapter weight with
    `adapters_only`, must be present)."""
    wanted = {name: tensor for name, tensor in model.state_dict().items() if not adapters_only or lora.is_adapter(name)}
    if ckpt.is_dir():
        # Load straight into the model's own tensors: only the weights are read, never the optimizer state; the
        # folder's pickled index goes through an allow-list (cllm.safe_checkpoint), so it cannot run code.
        load_sharded({"state_dict": {PREFIX + name: tensor for name, tensor in wanted.items()}}, ckpt)
        return
    state_dict = metadata.get("state_dict")
    if not state_dict:
        raise UserError(f"{ckpt}: no state_dict in this checkpoint")
    weights = {name[len(PREFIX) :]: tensor for name, tensor in state_dict.items() if name.startswith(PREFIX)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if name in wanted and not _is_tied(model, name)]
    if missing or unexpected:
        raise UserError(f"{ckpt}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def adapted(model: torch.nn.Module, ckpt: Path, metadata: dict, settings: lora.LoraSettings, spec: str):
    """`model` as a `peft.PeftModel` holding the checkpoint's adapters (`merge_and_unload` / `save_pretrained`)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora.peft_config(settings), adapter_name=lora.ADAPTER)
    peft_model.peft_config[lora.ADAPTER].base_model_name_or_path = local_folder(spec) or spec
    # PeftModel wraps the HF model (base_model.model): the names inside it are the training run's
    load_trained_weights(peft_model.base_model.model, ckpt, metadata, adapters_only=True)
    return peft_model


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name == "lm_head.weight"


def export(
    ckpt: Path, output: Path, *, model_spec: str | None = None, dtype: str | None = None, adapter: bool = False
) -> Path:
    """Write the HF folder `output` (atomically) and return it: the model (a LoRA checkpoint merged into its base),
    or with `adapter` the LoRA adapter alone in PEFT's format."""
    metadata = read_metadata(ckpt)
    hparams = dict(metadata.get("hyper_parameters") or {})
    spec = model_spec or hparams.get("model")
    if not spec:
        raise UserError(f"{ckpt}: no model spec in the checkpoint's hyperparameters; pass --model SPEC")
    settings = lora.settings_of(hparams.get("lora"))
    if adapter and settings is None:
        raise UserError(f"{ckpt} is a full fine-tuning checkpoint (model.init_args.lora null): it has no adapter")
    master = hparams.get("dtype", "float32")
    # a LoRA base trained in bf16 still merges in float32: B A is small next to W
    master = "float32" if master == "auto" or (settings and master in ("bfloat16", "float16")) else master
    model, tokenizer = load_model(spec, dtype=master, attn_implementation="sdpa")
    if settings is None:
        load_trained_weights(model, ckpt, metadata)
    else:
        base = lora.identity(spec, model_fingerprint(model), settings)
        lora.check_checkpoint(metadata, base, str(ckpt))
        model = adapted(model, ckpt, metadata, settings, spec)
        if not adapter:
            model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
    model.config.use_cache = True

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        # PEFT's `save_embedding_layers` default looks the base up on the hub; the embeddings are never adapted here
        extra = {"save_embedding_layers": False} if adapter else {}
        model.save_pretrained(staging, safe_serialization=True, **extra)
        tokenizer.save_pretrained(staging)
        provenance = {"checkpoint": str(ckpt), "base_model": spec, "global_step": metadata.get("global_step")}
        if settings is not None:
            saved = metadata[lora.CHECKPOINT_KEY]
            provenance.update(base_fingerprint=saved["base_fingerprint"], lora=saved["settings"])
            provenance["written"] = "adapter" if adapter else "merged"
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
        adapter: a LoRA checkpoint: write the adapter alone (PEFT format) instead of the merged model.
    """

    ckpt: str
    output: str
    model: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    adapter: bool = False


def main(argv: list[str]) -> None:
    args = parse_settings(ExportSettings, argv, "cllm export", __doc__.splitlines()[0])
    ckpt, output = Path(args.ckpt), Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"output {output} exists; pass --overwrite to replace it")
    out = export(ckpt, output, model_spec=args.model, dtype=args.dtype, adapter=args.adapter)
    how = "peft.PeftModel.from_pretrained(base, DIR)" if args.adapter else f"AutoModelForCausalLM or --model {out}"
    print(f"exported {ckpt} -> {out} (load with {how})")

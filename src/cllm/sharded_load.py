"""The model a run trains (`build_for_training`), and meta-device init for FSDP2: no rank holds the whole model.

    build on the meta device -> [inject LoRA adapters] -> fully_shard (each decoder layer, then the root) ->
    allocate each rank's shards -> each rank reads only its rows of every weight from the safetensors files
    (memory-mapped slices) -> [initialise the adapters: every rank draws the same full A and keeps its rows]

FSDP2 shards every parameter along dim 0 in `torch.chunk` pieces: rank r of w holds rows [r c, (r + 1) c) with
c = ceil(rows / w). Buffers that are not weights (rotary frequencies) are built for real on the CPU (only the
parameters go to the meta device) and kept. Works for any Hugging Face folder of safetensors (one file or an
index) and so for the GGUF-converted cache of `smollm2-135m`; export still gathers the full model only at the end.
A LoRA run's frozen base is sharded like a trained weight (docs/lora.md says why).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from cllm.errors import UserError
from cllm.fingerprints import model_fingerprint, weights_fingerprint
from cllm.lora import LoraSettings, add_adapters, base_name, identity, init_adapters, is_adapter
from cllm.models import (
    load_model,
    load_tokenizer,
    local_folder,
    resolve_dtype,
    shard_fsdp2,
)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (one file, or the index of a sharded checkpoint)."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / SINGLE).is_file():
        with safe_open(folder / SINGLE, "pt") as handle:
            return {key: folder / SINGLE for key in handle.keys()}
    raise UserError(f"{folder} has no {SINGLE} or {INDEX}: meta-device loading reads safetensors only")


def local_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, stop) rows of dim 0 that FSDP2 gives `rank` of `world` (torch.chunk pieces)."""
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def build_on_meta(folder: Path, attn_implementation: str, dtype: torch.dtype) -> PreTrainedModel:
    """The model of `folder`'s config with parameters on the meta device and real (CPU) buffers."""
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # init_empty_weights re-registers every parameter, which unties a tied LM head
    return model


@torch.no_grad()
def load_local_shards(model: torch.nn.Module, folder: Path, rank: int, world: int) -> None:
    """Fill each (FSDP2-sharded, allocated) parameter's local shard with its rows read from the safetensors.

    The file is opened (memory-mapped) per weight, so only one weight's rows are ever mapped in at a time. LoRA
    adapters are not in the files (`cllm.lora.init_adapters` fills them); an adapted layer's base weight is.
    """
    files = weight_files(folder)
    for name, parameter in model.named_parameters():  # a tied weight is listed once, under its first name
        if is_adapter(name):
            continue
        name = base_name(name)
        if name not in files:
            raise UserError(f"{folder}: weight {name!r} is not in the checkpoint; cannot load it sharded")
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        with safe_open(files[name], "pt", device="cpu") as handle:
            whole = handle.get_slice(name)
            start, stop = local_rows(whole.get_shape()[0], rank, world) if local is not parameter else (0, None)
            rows = whole[start:stop]
            if tuple(rows.shape) != tuple(local.shape):
                raise UserError(f"{folder}: weight {name!r} has shape {whole.get_shape()}, the model expects another")
            local.copy_(rows)
            del rows


def load_sharded(
    folder: str | Path,
    mesh,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    mp_policy=None,
    lora: LoraSettings | None = None,
) -> PreTrainedModel:
    """Build `folder`'s model on meta (with `lora` adapters, left uninitialised), shard it with FSDP2 over `mesh` and
    load each rank's shards in `dtype`."""
    folder = Path(folder)
    model = build_on_meta(folder, attn_implementation, dtype)
    if lora is not None:
        add_adapters(model, lora)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    shard_fsdp2(model, mesh, mp_policy=mp_policy)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    model.to_empty(device=device)
    for name, buffer in model.named_buffers():  # to_empty left them uninitialised
        buffer.copy_(buffers[name])
    load_local_shards(model, folder, mesh.get_local_rank(), mesh.size())
    return model


def data_parallel_mesh(mesh):
    """The data-parallel mesh of ModelParallelStrategy's 2D mesh; tensor parallelism is refused."""
    if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
        raise UserError(
            "tensor parallelism is not supported: set trainer.strategy.init_args.tensor_parallel_size=1 and "
            "data_parallel_size to the number of processes"
        )
    return mesh["data_parallel"]


def fsdp_policy(param_dtype: str | None, device: torch.device):
    """FSDP2's MixedPrecisionPolicy for `fsdp_param_dtype` (`auto` allowed; None: compute in the master dtype)."""
    if param_dtype is None:
        return None

    return MixedPrecisionPolicy(param_dtype=resolve_dtype(param_dtype, device), reduce_dtype=torch.float32)


def build_for_training(
    spec: str,
    mesh,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    mp_policy=None,
    meta_init: bool = True,
    lora: LoraSettings | None = None,
):
    """`(model, tokenizer, LoRA identity or None)` of a run: `spec` loaded whole (then sharded over `mesh` if given),
    or, under FSDP2 with a local folder and `meta_init`, built on meta and read shard by shard; `lora` adapters
    injected before sharding and initialised after it, the base fingerprinted as the checkpoint records it."""
    folder = local_folder(spec) if mesh is not None and meta_init else None
    if folder is not None:
        tokenizer = load_tokenizer(spec)
        attn, weights = attn_implementation, resolve_dtype(dtype)
        model = load_sharded(folder, mesh, attn_implementation=attn, dtype=weights, mp_policy=mp_policy, lora=lora)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        fingerprint = weights_fingerprint(spec) if lora else None
    else:
        model, tokenizer = load_model(spec, dtype=dtype, attn_implementation=attn_implementation)
        fingerprint = model_fingerprint(model) if lora else None
        if lora is not None:
            add_adapters(model, lora)
        if mesh is not None:
            shard_fsdp2(model, mesh, mp_policy=mp_policy)
    if lora is None:
        return model, tokenizer, None
    init_adapters(model, lora.seed)
    return model, tokenizer, identity(spec, fingerprint, lora)

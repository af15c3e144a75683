"""One script for a lent GPU (< 10 minutes): what our code does on it, as one JSON.

    python benchmarks/gpu_check.py                     # on a CUDA machine; writes docs/results/gpu_check.json
    python benchmarks/gpu_check.py --dry-run-cpu       # the same code at tiny shapes on the CPU (tests)

Sections (each records its error instead of stopping the others):
1. flash_attn: the import, and one bf16 forward with flash_attention_2 against sdpa;
2. pass_cost: ms per bf16 decode pass at the llama7b shape, blocks 1..32 after a 256-token cache (`cllm.timing`);
3. train_step: FSDP2 on one process (bf16 MixedPrecisionPolicy over float32 weights, AdamW, activation
   checkpointing) at 1B and 7B Llama shapes, random weights: tokens/s and MFU (`cllm.callbacks.throughput`);
4. jacobi: SmolLM2-135M greedy AR vs Jacobi in bf16, eager and compiled: TPF and tokens/s (`cllm evaluate`'s engine);
5. forcing_flex: a Jacobi Forcing row's 4D mask (256-token prompt, noisy|fixed pairs of 16-token blocks, window 4)
   through sdpa and FlexAttention (`cllm.models.flex_block_mask`), bf16, 1B shape, 2 layers: forward+backward ms
   (forward only on the CPU) and the logits' largest gap;
6. lora_step: the llama7b-lora recipe's step at 7B (bf16 frozen base, rank-32 float32 adapters on every projection,
   autocast, activation checkpointing): seconds, tokens/s and peak memory beside docs/results/lora/memory.json.
Without CUDA (and without --dry-run-cpu) it refuses in one line and exits 2.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cllm.arguments import parse_settings, run_script
from cllm.errors import UserError
from cllm.files import write_json
from cllm.hardware import auto_dtype, peak_flops, recorded_cpu_flags

SHAPES = {  # Llama shapes with random weights (vocab 32000)
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def llama(shape: str, device: str, dtype: torch.dtype, attn: str = "sdpa", layers: int | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    options = {**SHAPES[shape], "vocab_size": 32000 if shape != "tiny" else 259}
    options |= {"num_hidden_layers": layers} if layers is not None else {}
    config = LlamaConfig(**options, max_position_embeddings=4096, attn_implementation=attn)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def flash_attn_check(device: str) -> dict:
    import flash_attn  # noqa: F401  (the import is the first check)

    model = llama("1b", device, torch.bfloat16, attn="flash_attention_2", layers=2).eval()
    ids = torch.randint(0, 32000, (2, 512), device=device)
    with torch.no_grad():
        flash = model(input_ids=ids).logits.float()
        model.config._attn_implementation = "sdpa"
        sdpa = model(input_ids=ids).logits.float()
    return {"version": flash_attn.__version__, "max_abs_diff_vs_sdpa": float((flash - sdpa).abs().max())}


def pass_cost_check(device: str, shape: str, layers: int | None, repeats: int) -> dict:
    from cllm.timing import pass_seconds

    model = llama(shape, device, torch.bfloat16, layers=layers).eval()
    costs = {block: pass_seconds(model, 256, block, repeats) for block in (1, 4, 8, 16, 32)}
    rows = [{"block": block, "ms": cost * 1e3, "x_one_token": cost / costs[1]} for block, cost in costs.items()]
    return {"shape": shape, "layers": model.config.num_hidden_layers, "dtype": "bfloat16", "rows": rows}


def train_step_check(device: str, shape: str, rows: int, length: int, steps: int, layers: int | None = None) -> dict:
    """FSDP2 on one process: steps on random tokens, tokens/s and MFU of the median step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from cllm.callbacks.throughput import matmul_parameters, step_flops
    from cllm.models import shard_fsdp2

    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(delete=False).name
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    model = llama(shape, device, torch.float32, layers=layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_fsdp2(model, init_device_mesh(device, (1,)), mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (rows, length), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = statistics.median(timed(step, device, steps))
    counts = {"grad_tokens": rows * length, "no_grad_tokens": 0, "grad_squares": rows * length**2, "no_grad_squares": 0}
    flops = step_flops(matmul_parameters(model), model.config.num_hidden_layers, model.config.hidden_size, counts)
    peak = peak_flops(torch.device(device), torch.bfloat16)
    result = {"shape": shape, "layers": model.config.num_hidden_layers, "rows": rows, "length": length}
    result.update(seconds=seconds, tokens_per_s=rows * length / seconds, flops=flops, peak_flops=peak)
    result["mfu"] = flops / seconds / peak if peak else None
    return result | peak_memory(device)


def lora_step_check(device: str, shape: str, rank: int, rows: int, length: int, steps: int) -> dict:
    """A LoRA training step on a bf16 frozen base (`cllm.lora`): seconds, tokens/s and peak memory."""
    from cllm.lora import LoraSettings, add_adapters, init_adapters

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the earlier sections' peaks are not this step's
    model = llama(shape, device, torch.bfloat16)
    add_adapters(model, LoraSettings(rank=rank, alpha=2.0 * rank))
    init_adapters(model, seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=device == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (rows, length), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = statistics.median(timed(step, device, steps))
    result = {"shape": shape, "rank": rank, "rows": rows, "length": length, "seconds": seconds}
    result.update(tokens_per_s=rows * length / seconds, trained_parameters=sum(p.numel() for p in trained))
    return result | peak_memory(device)


def jacobi_check(device: str, spec: str, prompts: int, n: int, max_new_tokens: int, compiled: bool) -> dict:
    """Jacobi vs the fastest greedy AR through `cllm evaluate`'s engine (paired, every prompt timed)."""
    from cllm.evaluate import EvaluateSettings, evaluate

    settings = EvaluateSettings(
        model=spec,
        prompts=["stdlib-code:validation"],
        limit=prompts + 1,
        warmup=1,
        n=n,
        max_new_tokens=max_new_tokens,
        dtype="bfloat16",
        dtypes=["bfloat16"],
        device=device,
        compile=compiled,
        decoder=["jacobi"],
        quality=False,
        repeats=1,
    )
    entry = evaluate(settings)["models"]["cllm"]["stdlib-code"]
    jacobi, ar = entry["decoders"]["jacobi"], entry["ar"]
    return {"model": spec, "compiled": compiled, "n": n, "prompts": prompts, "ar_variant": ar["variant"]} | {
        "ar_tokens_per_s": ar["tokens_per_s"],
        "jacobi_speedup_median": jacobi["speedup_vs_ar"]["median"],
        "jacobi_ci95": jacobi["speedup_vs_ar"]["ci95"],
        "accepted_tokens_per_step": jacobi["tokens_per_step"],
    }


def forcing_row_mask(context: int, blocks: int, n: int, window: int) -> torch.Tensor:
    """[1, 1, L, L] may-attend mask of one Jacobi Forcing row (`cllm.data_modules.jacobi_forcing.may_attend`)."""
    from cllm.data_modules.jacobi_forcing import CONTEXT, FIXED, NOISY, may_attend

    kinds, pairs, windows = [CONTEXT] * context, [-1] * context, [-1] * context
    for block in range(blocks):
        for kind in (NOISY, FIXED):
            kinds += [kind] * n
            pairs += [block] * n
            windows += [block // window] * n
    rows = [torch.tensor([values]) for values in (kinds, pairs, windows)]
    return may_attend(*rows)[:, None]


def forcing_flex_check(device: str, shape: str, context: int, blocks: int, n: int, repeats: int) -> dict:
    from cllm.models import flex_block_mask

    may_attend = forcing_row_mask(context, blocks, n, window=4).to(device)
    length = may_attend.shape[-1]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # FlexAttention on CPU: float32 and lower
    model = llama(shape, device, dtype, layers=2)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    backward = device == "cuda"  # FlexAttention has no backward on the CPU
    figures, logits = {"length": length, "blocks": blocks, "n": n, "backward": backward}, {}
    for attention in ("sdpa", "flex_attention"):
        model.config._attn_implementation = attention
        mask = may_attend if attention == "sdpa" else flex_block_mask(may_attend)

        def run(mask=mask) -> torch.Tensor:
            with torch.set_grad_enabled(backward):
                out = model(input_ids=ids, attention_mask=mask).logits
            if backward:
                out.float().square().mean().backward()
            return out

        figures[f"{attention}_ms"] = 1000 * min(timed(run, device, repeats))  # its warm-up compiles flex
        logits[attention] = run().detach().float()
        model.zero_grad(set_to_none=True)
    figures["max_abs_logit_gap"] = float((logits["flex_attention"] - logits["sdpa"]).abs().max())
    # NaN compares false: an AVX2-only CPU's compiled grouped-query FlexAttention (torch 2.13) gave NaN logits
    figures["agrees_with_sdpa"] = figures["max_abs_logit_gap"] < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    figures["flex_over_sdpa"] = figures["flex_attention_ms"] / figures["sdpa_ms"]
    return figures


def peak_memory(device: str) -> dict:
    return {"max_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if device == "cuda" else {}


def timed(step: Callable[[], object], device: str, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `step`, after one untimed warm-up call (the device synchronised around each)."""
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    times = []
    for _ in range(repeats + 1):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def sections(dry_run: bool) -> dict:
    """name -> a call producing that section's figures; the dry run shrinks every shape to run on a CPU in seconds."""
    device = "cpu" if dry_run else "cuda"
    if dry_run:
        return {
            "pass_cost": lambda: pass_cost_check(device, "tiny", None, repeats=1),
            "train_step_tiny": lambda: train_step_check(device, "tiny", rows=2, length=16, steps=1),
            "jacobi_eager": lambda: jacobi_check(device, "tiny", prompts=1, n=4, max_new_tokens=8, compiled=False),
            "forcing_flex": lambda: forcing_flex_check(device, "tiny", context=8, blocks=4, n=4, repeats=1),
            "lora_step_tiny": lambda: lora_step_check(device, "tiny", rank=4, rows=2, length=16, steps=1),
        }
    return {
        "flash_attn": lambda: flash_attn_check(device),
        "pass_cost": lambda: pass_cost_check(device, "7b", None, repeats=5),
        "train_step_1b": lambda: train_step_check(device, "1b", rows=4, length=2048, steps=3),
        "train_step_7b": lambda: train_step_check(device, "7b", rows=1, length=2048, steps=3),
        "jacobi_eager": lambda: jacobi_check(device, "smollm2-135m", 8, n=16, max_new_tokens=128, compiled=False),
        "jacobi_compiled": lambda: jacobi_check(device, "smollm2-135m", 8, n=16, max_new_tokens=128, compiled=True),
        "forcing_flex": lambda: forcing_flex_check(device, "1b", context=256, blocks=32, n=16, repeats=3),
        "lora_step_7b": lambda: lora_step_check(device, "7b", rank=32, rows=4, length=1024, steps=3),
    }


@dataclass(kw_only=True)
class GpuCheckSettings:
    """`benchmarks/gpu_check.py`: what our code does on a lent GPU, as one JSON.

    Args:
        output: the JSON to write.
        dry_run_cpu: tiny shapes on the CPU: tests the code, no GPU.
        only: run only these sections (default: all).
    """

    output: str = "docs/results/gpu_check.json"
    dry_run_cpu: bool = False
    only: list[str] | None = None


def main(argv: list[str]) -> None:
    args = parse_settings(GpuCheckSettings, argv, "benchmarks/gpu_check.py", __doc__)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        raise UserError("needs a CUDA device and torch.cuda.is_available() is False here (--dry_run_cpu: on the CPU)")
    if unknown := sorted(set(args.only or []) - set(sections(args.dry_run_cpu))):
        raise UserError(f"--only {unknown}: no such sections; choose among {', '.join(sections(args.dry_run_cpu))}")

    device = "cpu" if args.dry_run_cpu else "cuda"
    choice = auto_dtype(device)
    machine = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    machine.update(cpu_flags=recorded_cpu_flags(), auto_dtype=choice.name, auto_reason=choice.reason)
    report = {"machine": machine, "dry_run_cpu": args.dry_run_cpu, "sections": {}}
    started = time.perf_counter()
    for name, call in sections(args.dry_run_cpu).items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            report["sections"][name] = {"ok": True, **call()}
        except Exception as err:  # a missing package or an OOM must not lose the other figures
            report["sections"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
            traceback.print_exc()
        report["sections"][name]["seconds"] = time.perf_counter() - start
        print(name, report["sections"][name], flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - started
    write_json(args.output, report)
    print(f"wrote {args.output} in {report['seconds']:.0f} s")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_script(main)

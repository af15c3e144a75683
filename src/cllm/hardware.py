"""What the machine we run on is good at: the `auto` dtype, and the peak FLOP/s that MFU is measured against.

`dtype: auto` resolves per device type, once per process:

| device | auto |
|---|---|
| CUDA with bf16 support (Ampere and later) | bfloat16 |
| CUDA without it (V100, T4) | float16 |
| CPU with AMX or AVX-512-BF16, where a one-second probe finds a bf16 matmul faster than float32 | bfloat16 |
| any other CPU (AVX2 only, ARM, or the probe finds bf16 slower) | float32 |

The flags come from /proc/cpuinfo (Linux); elsewhere the CPU is treated as having none. The probe guards against a
PyTorch build or a virtual machine that hides the fast path (bf16 matmuls are then 10-60x slower than float32).

An AVX2-only machine can be emulated on an AVX-512 one by starting the process with `AVX2_EMULATION` in its
environment (PyTorch's own kernels, oneDNN and MKL each limited to AVX2): /proc/cpuinfo still lists avx512_bf16,
the probe then finds bf16 matmuls slow and `auto` picks float32, as on a real AVX2-only CPU. `recorded_cpu_flags`
writes such limits beside the flags, so no figure taken under them passes for one of the full machine.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric.utilities.throughput import _CUDA_FLOPS, get_available_flops

log = logging.getLogger("cllm")

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # the first one found names the reason
RECORDED_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")  # written beside every benchmark figure
# the environment variables that cap the instruction set PyTorch (ATen), oneDNN and MKL use; read at process start
AVX2_EMULATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PROBE_SPEEDUP = 1.2  # bf16 must beat float32 by this factor: a near tie is not worth the rounding


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype `auto` picked and why (printed once, logged with the run's hyperparameters)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo); empty where there is none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def isa_limits(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The instruction-set caps this process runs under, as `VAR=value` (e.g. `ONEDNN_MAX_CPU_ISA=AVX2`)."""
    return [f"{name}={environ[name]}" for name in AVX2_EMULATION if environ.get(name)]


def capped_inductor_cache(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Under instruction-set caps, a TorchInductor cache folder of their own (`{}` without caps or if one is set).

    Measured on an AVX-512 machine: a model compiled there without the caps, then again under
    `ATEN_CPU_CAPABILITY=avx2` with the same (default) cache, generated garbage from its second token on (0 of 6
    prompts equal to eager AR); with a fresh cache the capped run equals eager AR. The caps must not share kernels.
    """
    limits, chosen = isa_limits(environ), environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    # Inductor writes its default (`/tmp/torchinductor_USER`) into the environment once it has compiled: not a choice.
    if not limits or (chosen and not Path(chosen).name.startswith("torchinductor_")):
        return {}
    tag = "-".join(limits).lower().replace("=", "_")  # names too: each cap alone must not share a folder
    return {"TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / f"cllm-inductor-{os.getuid()}-caps-{tag}")}


def emulate_avx2(argv: list[str]) -> None:
    """Re-execute this Python program (`argv[0]` is its script) with the AVX2 caps set; return if they already are.

    A re-exec rather than setting the variables here: ATen, oneDNN and MKL may have read them already. The capped
    process compiles into its own TorchInductor cache (`capped_inductor_cache`).
    """
    if all(os.environ.get(name) == value for name, value in AVX2_EMULATION.items()):
        return
    print(f"re-running under AVX2 emulation ({' '.join(isa_limits(AVX2_EMULATION))})", flush=True)
    environ = {**os.environ, **AVX2_EMULATION}
    os.execve(sys.executable, [sys.executable, *argv], environ | capped_inductor_cache(environ))


def recorded_cpu_flags() -> list[str]:
    """The flags that decide matmul speed, then any instruction-set caps, as written into benchmark JSON.

    For example `['avx2', 'avx512_bf16']`, or under AVX2 emulation `['avx2', 'avx512_bf16', 'ATEN_CPU_CAPABILITY=avx2',
    ...]`: the flags say what the CPU has, the caps what the process was allowed to use.
    """
    return sorted(cpu_flags() & set(RECORDED_CPU_FLAGS)) + isa_limits()


def bf16_probe(seconds: float = 1.0, size: int = 512) -> float:
    """How many times faster a bf16 matmul runs than a float32 one here (> 1: bf16 is faster), in ~`seconds`.

    The two dtypes are timed in alternation so that a neighbour's load on a shared machine hits both alike.
    """
    operands = {
        dtype: (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
        for dtype in (torch.float32, torch.bfloat16)
    }
    spent = {dtype: 0.0 for dtype in operands}
    count = {dtype: 0 for dtype in operands}
    for a, b in operands.values():
        a @ b  # warm-up: the first call pays for kernel selection
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(count.values()) < 2:
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            spent[dtype] += time.perf_counter() - start
            count[dtype] += 1
    per_call = {dtype: spent[dtype] / count[dtype] for dtype in operands}
    return per_call[torch.float32] / per_call[torch.bfloat16]


def cpu_auto_dtype(flags: frozenset[str], probe=bf16_probe) -> DtypeChoice:
    """bfloat16 where the CPU has AMX/AVX-512-BF16 and the probe confirms it is faster, else float32."""
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if not found:
        return DtypeChoice(torch.float32, "CPU without amx_bf16/avx512_bf16: bf16 matmuls are slow here")
    speedup = probe()
    if speedup >= PROBE_SPEEDUP:
        return DtypeChoice(torch.bfloat16, f"CPU with {found[0]}; probe: bf16 matmul {speedup:.1f}x float32's speed")
    return DtypeChoice(
        torch.float32, f"CPU with {found[0]}, but the probe found bf16 matmuls {speedup:.2f}x float32's speed"
    )


def cuda_auto_dtype(device: torch.device) -> DtypeChoice:
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return DtypeChoice(torch.bfloat16, f"CUDA device {name} supports bf16")
    return DtypeChoice(torch.float16, f"CUDA device {name} has no bf16 support: float16")


@functools.cache
def auto_dtype(device: str = "cpu") -> DtypeChoice:
    """What `dtype: auto` means on `device` (`cpu`, `cuda`, `cuda:1`, ...): decided once per process and printed."""
    target = torch.device(device)
    if target.type == "cuda":
        choice = cuda_auto_dtype(target)
    elif target.type == "cpu":
        choice = cpu_auto_dtype(cpu_flags(), bf16_probe)
    else:
        choice = DtypeChoice(torch.float32, f"device type {target.type!r}: float32")
    message = f"dtype auto -> {choice.name} on {target.type} ({choice.reason})"
    log.info(message)
    print(message, flush=True)
    return choice


def autocast_precision(choice: DtypeChoice) -> str:
    """The Lightning Trainer precision that trains float32 master weights at the auto dtype's compute speed."""
    return {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}.get(choice.dtype, "32-true")


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Theoretical peak FLOP/s of one device at `dtype` (Lightning's table; CUDA only), None when unknown."""
    if device.type != "cuda":
        return None
    if "h200" in torch.cuda.get_device_name(device).lower():
        # H200 computes like an H100 SXM; Lightning's h200 entries are the with-sparsity figures (2x dense)
        return float(_CUDA_FLOPS["h100 sxm"][dtype]) if dtype in _CUDA_FLOPS["h100 sxm"] else None
    found = get_available_flops(device, dtype)
    return float(found) if found else None


class OtherLoad:
    """The share of the machine's CPU time that *other* processes used while a block ran (Linux; None elsewhere).

    A timing taken beside another busy process is not this machine's speed: with OpenMP threads spin-waiting on
    2 cores one pass can take 10x its cost. Benchmarks record this figure beside their timings and warn above
    `BUSY_SHARE`. `with OtherLoad() as load: ...; load.share` (0 = the machine was ours alone)."""

    BUSY_SHARE = 0.1

    def __init__(self, stat: Path = Path("/proc/stat"), own: Path = Path("/proc/self/stat")) -> None:
        self.stat, self.own = stat, own
        self.share: float | None = None

    def _read(self) -> tuple[int, int, int] | None:
        try:
            fields = [int(v) for v in self.stat.read_text().splitlines()[0].split()[1:]]
            mine = self.own.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), sum(fields) - idle, int(mine[11]) + int(mine[12])  # total, busy, own utime + stime

    def __enter__(self) -> OtherLoad:
        self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return
        total, busy, own = (b - a for a, b in zip(self._start, end))
        self.share = max(busy - own, 0) / total

    @property
    def busy(self) -> bool:
        return self.share is not None and self.share > self.BUSY_SHARE

"""Peak memory per rank of loading a model for FSDP2: today's full load then shard, against meta-device init.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py          # SmolLM2-135M, 2 processes on CPU (gloo)

`plain`: every rank loads the whole float32 model (`cllm.models.load_model`), then `shard_fsdp2` keeps its shards.
`meta`: `cllm.sharded_load.load_sharded` builds on the meta device, shards, and each rank reads only its rows.
Each rank reports its peak RSS (ru_maxrss) and the RSS after the imports (the interpreter, torch and transformers,
which both modes pay alike), and a checksum of one forward so the two loads are seen to give the same model.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cllm.arguments import parse_settings, run_script
from cllm.errors import UserError

RANK_SCRIPT = Path(__file__).resolve()


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rank_main(mode: str, spec: str, out: Path) -> None:
    """One rank: load in `mode`, report memory and a forward checksum."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from cllm.models import _local_folder, load_model, shard_fsdp2
    from cllm.sharded_load import load_sharded

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = _local_folder(spec)  # converts a GGUF once (before the measurement on a warm cache)
    after_imports = rss_mib()
    mesh = init_device_mesh("cpu", (world,))
    if mode == "plain":
        model, _ = load_model(folder)
        shard_fsdp2(model, mesh)
    else:
        model = load_sharded(folder, mesh)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loaded = rss_mib()
    with torch.no_grad():
        checksum = float(model(input_ids=torch.arange(3, 19)[None]).logits.double().sum())
    result = {"rank": rank, "after_imports_mib": after_imports, "peak_mib": peak, "after_load_mib": loaded}
    result["checksum"] = checksum
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_mode(mode: str, spec: str, processes: int, out: Path) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, str(RANK_SCRIPT), "--rank_mode", mode, "--model", spec, "--scratch", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{mode} load failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(processes)]


@dataclass(kw_only=True)
class FsdpMemorySettings:
    """`benchmarks/fsdp_memory.py`: peak memory per rank of a full load then shard, against meta-device init.

    Args:
        model: model spec (cllm.models).
        processes: ranks (CPU processes, gloo).
        output: the JSON to write.
        rank_mode: internal: load this way as one rank of the launched processes.
        scratch: internal: the folder where each rank writes its figures.
    """

    model: str = "smollm2-135m"
    processes: int = 2
    output: str = "docs/results/fsdp_memory.json"
    rank_mode: Literal["plain", "meta"] | None = None
    scratch: str | None = None


def main(argv: list[str]) -> None:
    args = parse_settings(FsdpMemorySettings, argv, "benchmarks/fsdp_memory.py", __doc__)
    if args.processes < 1:
        raise UserError(f"--processes must be >= 1, got {args.processes}")
    if args.rank_mode:
        rank_main(args.rank_mode, args.model, Path(args.scratch))
        return

    from cllm.files import write_json
    from cllm.hardware import recorded_cpu_flags
    from cllm.models import _local_folder

    _local_folder(args.model)  # convert once, outside the measured processes
    with tempfile.TemporaryDirectory() as scratch:
        ranks = {mode: run_mode(mode, args.model, args.processes, Path(scratch)) for mode in ("plain", "meta")}
    worst = {mode: max(r["peak_mib"] for r in rows) for mode, rows in ranks.items()}
    imports = max(r["after_imports_mib"] for rows in ranks.values() for r in rows)
    ratio = worst["meta"] / worst["plain"]
    same = len({round(r["checksum"], 3) for rows in ranks.values() for r in rows}) == 1
    print(f"model={args.model} processes={args.processes} cpu={recorded_cpu_flags()}")
    print(f"{'mode':>6} {'rank':>4} {'after imports MiB':>17} {'peak MiB':>9} {'after load MiB':>14}")
    for mode, rows in ranks.items():
        for r in rows:
            memory = f"{r['after_imports_mib']:17.0f} {r['peak_mib']:9.0f} {r['after_load_mib']:14.0f}"
            print(f"{mode:>6} {r['rank']:>4} {memory}")
    print(f"worst-rank peak: meta / plain = {ratio:.2f} (goal <= 0.6); same forward: {same}")
    summary = {"worst_rank_peak_mib": worst, "meta_over_plain": ratio, "same_forward": same, "imports_mib": imports}
    settings = {"model": args.model, "processes": args.processes, "cpu_flags": recorded_cpu_flags()}
    write_json(args.output, {"settings": settings, "ranks": ranks, "summary": summary})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_script(main)

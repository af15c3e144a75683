"""TrajectoryDataModule memory while streaming many synthetic records: RSS must stay flat.

    python benchmarks/datamodule_memory.py --records 1000000 --output benchmarks/datamodule_memory.json

Writes `--records` synthetic records (n=16, a 48-token context, 4 states each) as shards in a temporary
folder, runs the data module's setup (the validating scan) and one full training epoch with the
uniform strategy, sampling the process RSS every `--every` batches. Flat = the last sample is within a
few MiB of the first one taken after the shuffle buffer filled.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cllm.arguments import parse_settings, run_script
from cllm.data_modules.trajectory_data import TrajectoryDataModule
from cllm.errors import UserError
from cllm.fingerprints import tokenizer_fingerprint
from cllm.models import build_tiny_tokenizer
from cllm.records import SHARD_PATTERN, write_manifest

N = 16


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def write_synthetic(folder: Path, records: int, per_shard: int) -> None:
    rng = random.Random(0)
    shards = []
    for index, start in enumerate(range(0, records, per_shard)):
        count = min(per_shard, records - start)
        path = folder / SHARD_PATTERN.format(index=index)
        with open(path, "w", encoding="utf-8") as out:
            for k in range(start, start + count):
                prompt = [rng.randrange(3, 259) for _ in range(32)]
                prefix = [rng.randrange(3, 259) for _ in range(16)]
                states = [[rng.randrange(3, 259) for _ in range(N)] for _ in range(4)]
                line = {
                    "prompt_id": f"s{k // 4}",
                    "block_index": k % 4,
                    "prompt_ids": prompt,
                    "prefix_ids": prefix,
                    "states": states,
                    "labels": None,
                }
                out.write(json.dumps(line, separators=(",", ":")) + "\n")
        shards.append({"file": path.name, "records": count})
    fingerprint = tokenizer_fingerprint(build_tiny_tokenizer())
    write_manifest(folder, {"model": "tiny", "tokenizer_fingerprint": fingerprint, "n": N, "shards": shards})


@dataclass(kw_only=True)
class DatamoduleMemorySettings:
    """`benchmarks/datamodule_memory.py`: the data module's RSS while streaming many synthetic records.

    Args:
        records: synthetic records written (n=16, a 48-token context, 4 states each).
        per_shard: records per shard.
        batch_size: records per batch.
        shuffle_buffer: the data module's shuffle buffer (records).
        every: sample RSS every this many batches.
        folder: reuse/keep the synthetic dataset here (default: a temporary folder).
        output: the JSON to write.
    """

    records: int = 1_000_000
    per_shard: int = 50_000
    batch_size: int = 64
    shuffle_buffer: int = 1000
    every: int = 500
    folder: str | None = None
    output: str = str(Path(__file__).with_suffix(".json"))


def main(argv: list[str]) -> None:
    args = parse_settings(DatamoduleMemorySettings, argv, "benchmarks/datamodule_memory.py", __doc__)
    for key in ("records", "per_shard", "batch_size", "shuffle_buffer", "every"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(args, key)}")

    with tempfile.TemporaryDirectory() as temp:
        folder = Path(args.folder or temp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if not (folder / "manifest.json").is_file():
            write_synthetic(folder, args.records, args.per_shard)
        written = time.perf_counter() - start
        size_mib = sum(p.stat().st_size for p in folder.glob("shard-*.jsonl")) / 2**20
        rss_start = rss_mib()
        dm = TrajectoryDataModule(
            str(folder), "tiny", n=N, batch_size=args.batch_size, val_fraction=0.0, shuffle_buffer=args.shuffle_buffer
        )
        start = time.perf_counter()
        dm.setup("fit")
        scanned = time.perf_counter() - start
        rss_after_setup = rss_mib()
        samples, curve = 0, []
        start = time.perf_counter()
        for step, batch in enumerate(dm.train_dataloader()):
            samples += batch["input_ids"].shape[0]
            if step % args.every == 0:
                curve.append({"batch": step, "samples": samples, "rss_mib": round(rss_mib(), 1)})
        streamed = time.perf_counter() - start
        curve.append({"batch": step, "samples": samples, "rss_mib": round(rss_mib(), 1)})
    settled = curve[min(2, len(curve) - 1)]["rss_mib"]
    result = {
        "benchmark": "datamodule_memory",
        "records": args.records,
        "dataset_mib": round(size_mib, 1),
        "write_s": round(written, 1),
        "setup_scan_s": round(scanned, 1),
        "stream_s": round(streamed, 1),
        "samples_per_s": round(samples / streamed, 1),
        "samples": samples,
        "rss_before_setup_mib": round(rss_start, 1),
        "rss_after_setup_mib": round(rss_after_setup, 1),
        "rss_settled_mib": settled,
        "rss_end_mib": curve[-1]["rss_mib"],
        "rss_max_mib": max(point["rss_mib"] for point in curve),
        "rss_growth_after_settling_mib": round(curve[-1]["rss_mib"] - settled, 1),
        "curve": curve,
    }
    for key, value in result.items():
        if key != "curve":
            print(f"{key:32} {value}")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_script(main)

"""Load on `cllm serve`: requests/s, time to first token and tokens/s at several client counts, each decoder against
the same server decoding AR, every response checked token for token against greedy AR decoded here.

    python benchmarks/serve_load.py --model smollm2-135m --prompts json-extract:test --limit 8 \
        --decoders ar jacobi recycle --clients 1 4 16 --max_tokens 48 --output docs/results/serve_load.json

For each decoder (and `--batching` mode) it starts one server (`python -m cllm serve`, a free port on 127.0.0.1),
waits until /health answers, then for each client count c runs c threads of the `openai` client (streaming, usage and
token ids on) over max(c, --requests) requests cycling through the prompts, and stops the server with SIGTERM.
The greedy reference is `decode_batched` at n = 1 (batch 1) in this process, in the server's dtype.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cllm.arguments import parse_settings, run_script
from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.decoders import decode_batched
from cllm.files import atomic_write_text, write_json
from cllm.hardware import recorded_cpu_flags
from cllm.jacobi import DecodeOptions
from cllm.models import eos_ids, load_model


@dataclass(kw_only=True)
class LoadSettings:
    """`benchmarks/serve_load.py`: load-test `cllm serve` with the real `openai` client.

    Args:
        model: the model spec served (smollm2-135m, an exported folder, tiny).
        prompts: prompt source (bundled set, .jsonl, ...); sent as one user message each (chat route).
        limit: prompts used.
        decoders: servers to compare (ar is the same server at n = 1).
        batching: batching modes, each with every decoder.
        clients: concurrent client counts.
        requests: requests per client count (at least the count itself).
        max_tokens: budget of every request.
        n: block size of jacobi and recycle.
        dtype: the servers' and the reference's dtype (float32: batched rows stay bitwise independent).
        max_batch_size: the servers' --max_batch_size.
        threads: OMP_NUM_THREADS of each server (0: leave the environment's).
        output: results JSON.
        note: free text recorded with the results (say whether the machine was shared).
        docs: markdown file whose serve-load block gets the table of `render` ('' to leave it).
        render: results JSON files to tabulate into `docs` without running anything (the table's one generator).
    """

    model: str = "smollm2-135m"
    prompts: str = "json-extract:test"
    limit: int = 8
    decoders: list[str] = field(default_factory=lambda: ["ar", "jacobi", "recycle"])
    batching: list[Literal["continuous", "static"]] = field(default_factory=lambda: ["continuous"])
    clients: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int = 8
    max_tokens: int = 48
    n: int = 16
    dtype: str = "float32"
    max_batch_size: int = 16
    threads: int = 0
    output: Path = Path("docs/results/serve_load.json")
    note: str = ""
    docs: str = "docs/serving.md"
    render: list[str] = field(default_factory=list)


def greedy_references(settings: LoadSettings) -> tuple[list[str], list[list[int]]]:
    """The prompts and greedy AR's tokens for each (batch 1, n = 1: `jacobi_generate`, not the server's engine)."""
    prompts = load_prompts(settings.prompts, limit=settings.limit)
    model, tokenizer = load_model(settings.model, dtype=settings.dtype)
    ids = encode_prompts(tokenizer, prompts)
    options = DecodeOptions(n=1, max_new_tokens=settings.max_tokens, eos_token_id=eos_ids(model, tokenizer))
    tokens = decode_batched(model, ids, batch_size=1, options=options).tokens
    return [p.text for p in prompts], tokens


def start_server(settings: LoadSettings, decoder: str, batching: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(settings.threads)} if settings.threads else {}))
    command = [sys.executable, "-m", "cllm", "serve", "--model", settings.model, "--decoder", decoder]
    command += ["--n", str(settings.n), "--dtype", settings.dtype, "--batching", batching, "--port", str(port)]
    command += ["--max_batch_size", str(settings.max_batch_size), "--served_model_name", "served"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    import httpx

    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if server.poll() is not None:
            raise SystemExit(f"cllm serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("cllm serve was not healthy within 10 minutes")


def one_request(client, prompt: str, max_tokens: int) -> dict:
    """A streamed chat request: its latency, time to first content, tokens, and the server's decoder stats."""
    start = time.perf_counter()
    first, tokens, usage, stats = None, [], None, None
    stream = client.chat.completions.create(
        model="served", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.choices:
            tokens += (chunk.choices[0].model_extra or {}).get("token_ids") or []
        if chunk.usage is not None:
            usage, stats = chunk.usage, chunk.model_extra["cllm"]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "ttft": first if first is not None else seconds, "tokens": tokens,
            "completion_tokens": usage.completion_tokens, "passes": stats["decode_passes"]}  # fmt: skip


def load_level(url: str, texts: list[str], references: list[list[int]], clients: int, settings: LoadSettings) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    jobs = list(range(max(clients, settings.requests)))
    results, errors, lock = {}, [], threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                job = jobs.pop(0)
            try:
                results[job] = one_request(client, texts[job % len(texts)], settings.max_tokens)
            except Exception as err:  # counted, not raised: a dropped request is a finding
                errors.append(f"request {job}: {err}")

    start = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done = list(results.values())
    wrong = [j for j, r in results.items() if r["tokens"] != references[j % len(texts)]]
    tokens = sum(r["completion_tokens"] for r in done)
    return {
        "clients": clients,
        "requests": len(results) + len(errors),
        "answered": len(done),
        "errors": errors,
        "wrong": len(wrong),
        "seconds": wall,
        "requests_per_s": len(done) / wall,
        "ttft_s_median": statistics.median(r["ttft"] for r in done) if done else None,
        "latency_s_median": statistics.median(r["seconds"] for r in done) if done else None,
        "tokens_per_s_per_request_median": statistics.median(r["completion_tokens"] / r["seconds"] for r in done)
        if done
        else None,
        "tokens_per_s_total": tokens / wall,
        "accepted_tokens_per_pass": tokens / max(sum(r["passes"] for r in done), 1),
    }


def main(argv: list[str]) -> None:
    settings = parse_settings(LoadSettings, argv, "serve_load.py", __doc__)
    if settings.render:
        return write_docs(settings.docs, settings.render)
    texts, references = greedy_references(settings)
    rows = []
    for batching in settings.batching:
        for decoder in settings.decoders:
            server, url = start_server(settings, decoder, batching)
            try:
                for clients in settings.clients:
                    row = {"decoder": decoder, "batching": batching} | load_level(
                        url, texts, references, clients, settings
                    )
                    rows.append(row)
                    print(format_row(row), flush=True)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(120)
    ar = {(r["batching"], r["clients"]): r["tokens_per_s_total"] for r in rows if r["decoder"] == "ar"}
    for row in rows:  # each decoder against the same server decoding AR, same batching and clients
        base = ar.get((row["batching"], row["clients"]))
        row["total_tokens_per_s_vs_ar"] = row["tokens_per_s_total"] / base if base else None
    result = {
        "command": " ".join(["python", "benchmarks/serve_load.py", *argv]),
        "settings": asdict(settings) | {"output": str(settings.output)},
        "machine": {"cpu_flags": recorded_cpu_flags(), "cores": os.cpu_count(), "note": settings.note},
        "rows": rows,
    }
    write_json(settings.output, result)
    print(f"wrote {settings.output}")
    if settings.docs:
        write_docs(settings.docs, [str(settings.output)])


BEGIN, END = "<!-- serve-load:begin -->", "<!-- serve-load:end -->"
COLUMNS = "| decoder | batching | clients | answered (wrong) | req/s | TTFT median s | tok/s per request | tok/s total | x AR total | tokens/pass |"  # noqa: E501


def render(path: str) -> str:
    """One results JSON as a markdown table, under the command and machine that produced it."""
    result = json.loads(Path(path).read_text())
    machine = result["machine"]
    lines = [f"`{result['command']}` ({path}; CPU flags {' '.join(machine['cpu_flags'])}, {machine['cores']} cores"
             + (f"; {machine['note']}" if machine["note"] else "") + ")", "", COLUMNS, "|" + "---|" * 10]  # fmt: skip
    for row in result["rows"]:
        vs_ar = f"{row['total_tokens_per_s_vs_ar']:.2f}" if row["total_tokens_per_s_vs_ar"] else "-"
        lines.append(
            f"| {row['decoder']} | {row['batching']} | {row['clients']} | {row['answered']}/{row['requests']} "
            f"({row['wrong']}) | {row['requests_per_s']:.2f} | {row['ttft_s_median']:.2f} | "
            f"{row['tokens_per_s_per_request_median']:.1f} | {row['tokens_per_s_total']:.1f} | {vs_ar} | "
            f"{row['accepted_tokens_per_pass']:.2f} |"
        )
    return "\n".join(lines)


def write_docs(docs: str, paths: list[str]) -> None:
    """Fill the serve-load block of `docs` with the tables of `paths` (the block lists every file given)."""
    text = Path(docs).read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{docs}: no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    body = "\n\n".join(render(path) for path in paths)
    atomic_write_text(Path(docs), f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote the table into {docs}")


def format_row(row: dict) -> str:
    return (
        f"{row['decoder']:>8} {row['batching']:>10} clients={row['clients']:>2} answered={row['answered']} "
        f"wrong={row['wrong']} errors={len(row['errors'])} req/s={row['requests_per_s']:.2f} "
        f"ttft={row['ttft_s_median']:.2f}s tok/s/request={row['tokens_per_s_per_request_median']:.1f} "
        f"tok/s total={row['tokens_per_s_total']:.1f} tokens/pass={row['accepted_tokens_per_pass']:.2f}"
    )


if __name__ == "__main__":
    run_script(main)

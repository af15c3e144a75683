"""`python -m cllm serve`: an OpenAI-compatible HTTP server for a CLLM, on LitServe (see docs/serving.md).

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both streaming or not), `GET /v1/models`, `GET /health`,
`GET /metrics`. `--decoder jacobi | recycle | ar`: a greedy request gets greedy AR's text (lossless), a sampled one
(temperature > 0; jacobi and ar) draws exact in distribution (`cllm.sampling`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass, replace
from typing import Literal

from cllm.arguments import parse_settings
from cllm.errors import UserError
from cllm.generate import DecodeSettings, check_decoding_settings

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the ones LitServe binds; "localhost" is read as 127.0.0.1


@dataclass(kw_only=True)
class ServeSettings(DecodeSettings):
    """`cllm serve`: load a model once, warm it up and serve it over an OpenAI-compatible HTTP API.

    Args:
        decoder: jacobi | recycle (rejection recycling, G = --candidates; greedy requests only) | ar (n = 1).
        host: address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface).
        port: TCP port (1024-65535).
        max_batch_size: the most rows decoded together; a request with n choices (or several prompts) takes a row each.
        batching: continuous (a queued request joins the running batch as soon as a row is free) | static (a batch
            runs until its last row finishes, then the next one starts).
        max_tokens: the budget of a request that names none (max_tokens, max_completion_tokens).
        max_tokens_limit: the most new tokens a request may ask for (more: 400).
        max_request_bytes: the largest request body accepted (more: 413).
        max_rows_per_request: the most choices (n x prompts) one request may ask for (more: 400).
        served_model_name: the model id clients send and /v1/models lists (default: --model as given).
        log_level: LitServe's and uvicorn's log level: debug | info | warning | error.
    """

    decoder: Literal["jacobi", "recycle", "ar"] = "jacobi"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8
    batching: Literal["continuous", "static"] = "continuous"
    max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_request_bytes: int = 1_000_000
    max_rows_per_request: int = 16
    served_model_name: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "warning"

    @property
    def block_size(self) -> int:
        """The n the engine decodes with (1 for `ar`)."""
        return 1 if self.decoder == "ar" else int(self.n)

    @property
    def pool_candidates(self) -> int:
        """G, the pool n-grams verified per pass (0 unless `recycle`)."""
        return self.candidates if self.decoder == "recycle" else 0

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def as_decoding(self) -> DecodeSettings:
        """The same settings as `cllm.generate` reads them (ar is jacobi at n = 1)."""
        return replace(self, decoder="recycle" if self.decoder == "recycle" else "jacobi", n=self.block_size)


def check_serve_settings(settings: ServeSettings) -> ServeSettings:
    """Refuse impossible settings before anything starts; `localhost` becomes 127.0.0.1."""
    if settings.n == "auto":
        raise UserError("--n auto is a bench option (it measures on a prompt set); give serve an integer")
    if settings.compile:
        raise UserError("--compile is not served (its static cache holds a fixed batch); leave it out")
    if settings.temperature or settings.top_k or settings.top_p != 1.0:
        raise UserError(
            "--temperature, --top_k, --top_p: each request chooses its own sampling (its temperature, top_p and "
            "top_k fields); the server takes none"
        )
    check_decoding_settings(settings.as_decoding())
    host = "127.0.0.1" if settings.host == "localhost" else settings.host
    if host not in HOSTS:
        raise UserError(f"--host {settings.host!r}: LitServe listens on one of {', '.join(HOSTS)} (or localhost)")
    if not 1024 <= settings.port <= 65535:
        raise UserError(f"--port must be in 1024-65535, got {settings.port}")
    for name in ("max_batch_size", "max_tokens", "max_tokens_limit", "max_request_bytes", "max_rows_per_request"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(settings, name)}")
    if settings.max_tokens > settings.max_tokens_limit:
        raise UserError(f"--max_tokens {settings.max_tokens} is above --max_tokens_limit {settings.max_tokens_limit}")
    return replace(settings, host=host)


def _stop_on_sigterm(main_pid: int):
    """LitServe shuts down cleanly (workers, uvicorn, the queue manager) on KeyboardInterrupt only; a bare SIGTERM
    would end the main process and orphan the others. The uvicorn process forked from it inherits this handler
    and re-raises SIGTERM once it has closed its connections: there it just exits."""

    def handler(signum, frame) -> None:
        if os.getpid() != main_pid:
            raise SystemExit(0)
        raise KeyboardInterrupt

    return handler


def serve(settings: ServeSettings) -> None:
    """Start the server and block until SIGINT or SIGTERM."""
    import litserve as ls

    from cllm.serve_worker import CLLMAPI, exit_with_parent

    settings = check_serve_settings(settings)
    api = CLLMAPI(settings)
    accelerator = "cuda" if str(settings.device).startswith("cuda") else "cpu"
    # timeout=False: a request waits in the queue as long as the batch ahead of it takes (no 504 after LitServe's
    # default 30 s on a slow CPU); clients set their own timeout (openai's default: 600 s).
    server = ls.LitServer(api, accelerator=accelerator, devices=1, timeout=False, track_requests=False)
    server.uvicorn_graceful_timeout = 5  # open streams get 5 s to finish on shutdown, not 30
    lifespan = server.app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def exit_with_main(app):  # runs in the HTTP process, forked from this one
        exit_with_parent()
        async with lifespan(app):
            yield

    server.app.router.lifespan_context = exit_with_main
    signal.signal(signal.SIGTERM, _stop_on_sigterm(os.getpid()))
    print(
        f"cllm serve: loading {settings.model} ({settings.decoder} n={settings.block_size}, {settings.batching} "
        f"batching of up to {settings.max_batch_size} rows); http://{settings.host}:{settings.port}/v1 opens when warm",
        file=sys.stderr,
        flush=True,
    )
    server.run(
        host=settings.host,
        port=settings.port,
        num_api_servers=1,
        log_level=settings.log_level,
        generate_client_file=False,
    )


def main(argv: list[str]) -> None:
    serve(parse_settings(ServeSettings, argv, "cllm serve", __doc__))

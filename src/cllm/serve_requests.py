"""Reading `cllm serve` requests: the accepted fields, their limits, and OpenAI-style errors for everything else.

A request becomes a `Job`: one row payload per choice (prompt i, choice j at index i * n + j), each carrying what the
worker needs (the messages or prompt, the budget, the stop strings, the sampling settings). Everything refused here is
a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises
`BadRequestError` (400), `NotFoundError` (404) or `APIStatusError` (413) with the message.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Fields with a meaning we do not serve; sent with a non-default value they are refused, not silently ignored.
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
NOT_SAMPLED = (
    "this server decodes with recycle, which cannot sample exactly (it keeps the best of several verified drafts); "
    "send temperature 0 (greedy), or sample from a server started with --decoder jacobi or ar"
)


class APIError(Exception):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(status, message, param=param, code=code)


def error_body(status: int, message: str, kind: str | None = None, param: str | None = None, code=None) -> dict:
    kind = kind or {404: "not_found_error", 413: "request_too_large"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}, "status": status}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content as text: a string, or the text parts of a list (other parts are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise APIError(400, "only text content parts ({'type': 'text', 'text': ...}) are served", "messages")
        return "".join(part["text"] for part in self.content)


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # absent or 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension (vLLM has it too); 0: all tokens
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    return_token_ids: bool = False  # cllm (and vLLM) extension: each choice's token ids beside its text


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] = Field(min_length=1)


@dataclass
class Job:
    """A parsed request: its row payloads (in choice order) and how to answer."""

    kind: Literal["chat", "completion"]
    rows: list[dict]
    n: int
    stream: bool
    include_usage: bool
    return_token_ids: bool


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by its Content-Length or as it streams in)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, more than this server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is more than this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def parse_job(body: dict, kind: Literal["chat", "completion"], settings) -> Job:
    """Check a request against the schema and the server's limits (`cllm.serve.ServeSettings`)."""
    schema = ChatRequest if kind == "chat" else CompletionRequest
    try:
        request = schema.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None
    if request.model != settings.model_name:
        raise APIError(
            404, f"model {request.model!r} is not served here; this server serves {settings.model_name!r}",
            "model", "model_not_found",
        )  # fmt: skip
    for name, defaults in UNSUPPORTED.items():
        if name in body and body[name] not in defaults:
            raise APIError(400, f"{name} is not supported by cllm serve", name)
    if request.temperature and settings.decoder == "recycle":
        raise APIError(400, NOT_SAMPLED, "temperature")
    budget = (getattr(request, "max_completion_tokens", None) or request.max_tokens) or settings.max_tokens
    if budget > settings.max_tokens_limit:
        raise APIError(
            400, f"max_tokens {budget} is above this server's limit of {settings.max_tokens_limit}", "max_tokens"
        )
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop takes at most 4 non-empty strings", "stop")
    if kind == "chat":
        prompts = [[{"role": m.role, "content": m.text()} for m in request.messages]]
    elif isinstance(request.prompt, str) or all(isinstance(t, int) for t in request.prompt):
        prompts = [request.prompt]  # one text, or one prompt of token ids
    else:
        prompts = list(request.prompt)
    if len(prompts) * request.n > settings.max_rows_per_request:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={request.n} is more than this server's limit of "
                       f"{settings.max_rows_per_request} choices per request", "n")  # fmt: skip
    field = "messages" if kind == "chat" else "prompt"
    rows = [
        {"kind": kind, field: prompt, "max_tokens": budget, "stop": stops, "sampling": sampling(request, index)}
        for index, prompt in enumerate(p for p in prompts for _ in range(request.n))
    ]
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Job(kind, rows, request.n, request.stream, include_usage, request.return_token_ids)


def sampling(request: Common, index: int) -> dict:
    """Row `index`'s `cllm.sampling.SamplingSettings` fields: greedy without a temperature; a given seed + the row's
    index (so the n choices differ, and choice 0 of one prompt draws what `cllm generate --seed` draws), else a
    random seed."""
    seed = request.seed + index if request.seed is not None else secrets.randbelow(2**31)
    return {"temperature": request.temperature or 0.0, "top_k": request.top_k or 0, "top_p": request.top_p or 1.0,
            "seed": seed}  # fmt: skip

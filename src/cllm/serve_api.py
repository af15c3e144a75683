"""The HTTP side of `cllm serve`: OpenAI's routes as a LitServe spec (docs/serving.md has the API and its limits).

LitServe 0.2.19's `OpenAISpec` serves chat only, says "stop" when the budget cut the text, sums or drops usage
depending on streaming and never notices a client that left, so this spec replaces it. Each route checks the request
(`cllm.serve_requests`), puts one row per choice in the worker's queue, and turns the worker's per-pass messages into
one SSE chunk per pass, or into one response once every row finished. A client that disconnects has its rows cancelled
(the worker drops them from the batch); `/metrics` is rendered from what this process saw.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from cllm.serve_metrics import Metrics
from cllm.serve_requests import APIError, Job, parse_job, parse_json, read_body


class Disconnected(Exception):
    """The client went away while its request was queued or decoding."""


class OpenAIRoutes(LitSpec):
    """`/v1/chat/completions`, `/v1/completions`, `/v1/models` and `/metrics` over one decoding worker."""

    def __init__(self, settings) -> None:
        super().__init__()
        self.api_path = "/v1/chat/completions"  # LitServe keys the worker's request queue by it
        self.settings = settings
        self.metrics = Metrics()
        self.created = int(time.time())

    @property
    def stream(self) -> bool:  # the worker always answers pass by pass; non-streamed responses are joined here
        return True

    def pre_setup(self, lit_api) -> None:
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/metrics", self.prometheus, ["GET"])

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    async def chat_completions(self, request: Request) -> Response:
        return await self.answer(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.answer(request, "completion")

    async def models(self, request: Request) -> Response:
        model = {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "cllm"}
        return JSONResponse({"object": "list", "data": [model]})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def answer(self, request: Request, kind: str) -> Response:
        route, started = request.url.path, time.monotonic()
        try:
            job = parse_job(parse_json(await read_body(request, self.settings.max_request_bytes)), kind, self.settings)
        except APIError as err:
            self.metrics.request_done(route, err.status)
            return JSONResponse(without_status(err.body), status_code=err.status)
        reply = Reply(self, job, request, started)
        if (failed := await settle(reply, reply.started())) is not None:
            return failed
        if job.stream:
            return StreamingResponse(self.events(reply), media_type="text/event-stream")
        if (failed := await settle(reply, drain(reply.messages()))) is not None:
            return failed
        reply.close(200)
        return JSONResponse(reply.response())

    async def events(self, reply: Reply):
        """The SSE stream: a role chunk (chat), one chunk per row per decoding pass, usage if asked, [DONE]."""
        status = 499  # until the stream ends normally or with an error
        try:
            if reply.job.kind == "chat":
                for index in range(len(reply.uids)):
                    yield sse(reply.chunk([reply.choice(index, {"role": "assistant", "content": ""})]))
            async for batch in reply.messages():  # passes that queued up while the client read go out one by one:
                for k, (index, message) in enumerate(batch):  # a chunk holds one delta of a choice, never two
                    done = k == len(batch) - 1 and reply.finished_all()
                    choice = reply.choice(index, reply.delta(message), message)
                    yield sse(reply.chunk([choice], cllm=reply.totals() if done else None))
            if reply.job.include_usage:
                yield sse(reply.chunk([], usage=reply.usage(), cllm=reply.totals()))
            yield "data: [DONE]\n\n"
            status = 200
        except APIError as err:
            status = err.status
            yield sse(without_status(err.body))
        finally:
            reply.close(status)


class Reply:
    """One request in flight: its rows' uids and message queues (one shared wake-up event), and what they said."""

    def __init__(self, routes: OpenAIRoutes, job: Job, request: Request, started: float) -> None:
        self.routes, self.job, self.request, self.started_at = routes, job, request, started
        self.id = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.event = asyncio.Event()
        self.uids = [uuid.uuid4().hex for _ in job.rows]
        self.queues = [deque() for _ in job.rows]
        self.texts = [""] * len(job.rows)
        self.tokens: list[list[int]] = [[] for _ in job.rows]
        self.last: list[dict | None] = [None] * len(job.rows)  # each row's latest message (its running totals)
        self.first_token_at: float | None = None
        self.checked_at = started  # when the client's connection was last checked
        self.closed = False
        routes.metrics.in_flight += 1
        for uid, queue, payload in zip(self.uids, self.queues, job.rows):
            routes.response_buffer[uid] = ResponseBufferItem(event=self.event, response_queue=queue)
            routes.request_queue.put((routes.response_queue_id, uid, time.monotonic(), payload))

    async def wait(self) -> None:
        """Until a message arrives (1 s at most); a client gone meanwhile raises `Disconnected`, checked once a
        second even while messages keep coming (a non-streamed request notices nothing else)."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        if time.monotonic() - self.checked_at >= 1.0:
            self.checked_at = time.monotonic()
            if await self.request.is_disconnected():
                raise Disconnected

    async def started(self) -> None:
        """Until every row has answered once: its first pass, or its refusal (raised as `APIError`)."""
        while True:
            self.event.clear()
            for queue in self.queues:
                if queue and queue[0][1] == LitAPIStatus.ERROR:
                    body = queue[0][0]
                    raise APIError(
                        body["status"], body["error"]["message"], body["error"]["param"], body["error"]["code"]
                    )
            if all(self.queues):
                return
            await self.wait()

    async def messages(self):
        """Yield each arrival's `[(row index, message), ...]` until every row finished; record them."""
        while not self.finished_all():
            self.event.clear()
            batch = []
            for index, queue in enumerate(self.queues):
                while queue:
                    message, status = queue.popleft()
                    if status == LitAPIStatus.ERROR:
                        raise APIError(message["status"], message["error"]["message"], code=message["error"]["code"])
                    batch.append((index, self.record(index, message)))
            if batch:
                yield batch
            else:
                await self.wait()

    def record(self, index: int, message: dict) -> dict:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.routes.metrics.first_token.observe(self.first_token_at - self.started_at)
        self.texts[index] += message["text"]
        self.tokens[index] += message["token_ids"]
        self.last[index] = message
        self.routes.metrics.batch_rows = message["batch_rows"]
        if message["finish_reason"]:
            self.routes.metrics.choice_done(message)
        return message

    def finished_all(self) -> bool:
        return all(m is not None and m["finish_reason"] for m in self.last)

    def close(self, status: int) -> None:
        """Forget the rows, cancel those still decoding (the client left or failed), count the request."""
        if self.closed:
            return
        self.closed = True
        routes = self.routes
        for uid, message in zip(self.uids, self.last):
            routes.response_buffer.pop(uid, None)
            if message is None or not message["finish_reason"]:
                routes.request_queue.put((routes.response_queue_id, uid, time.monotonic(), {"cancel": uid}))
        routes.metrics.in_flight -= 1
        if status == 200:
            routes.metrics.prompt_tokens += self.usage()["prompt_tokens"]
        routes.metrics.request_done(self.request.url.path, status, time.monotonic() - self.started_at)

    def usage(self) -> dict:
        """Prompt tokens once per prompt (not per choice), completion tokens of every choice."""
        prompt = sum(m["prompt_tokens"] for m in self.last[:: self.job.n] if m)
        completion = sum(m["completion_tokens"] for m in self.last if m)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stats(self, message: dict) -> dict:
        passes = message["decode_passes"]
        tokens = message["completion_tokens"]
        return {
            "decode_passes": passes,
            "accepted_tokens_per_pass": round(tokens / passes, 4) if passes else 0.0,
            "recycled_passes": message["recycled_passes"],
        }

    def totals(self) -> dict:
        """The documented `cllm` object beside `usage`: decoder, n and the request's passes, all choices together."""
        settings = self.routes.settings
        passes = sum(m["decode_passes"] for m in self.last if m)
        tokens = sum(m["completion_tokens"] for m in self.last if m)
        return {
            "decoder": settings.decoder,
            "n": settings.block_size,
            "decode_passes": passes,
            "accepted_tokens_per_pass": round(tokens / passes, 4) if passes else 0.0,
            "recycled_passes": sum(m["recycled_passes"] for m in self.last if m),
            "convention": "completion tokens / decode passes, prefill excluded; AR = 1.0",
        }

    def delta(self, message: dict) -> dict:
        return {"content": message["text"]}

    def choice(self, index: int, content: dict, message: dict | None = None) -> dict:
        """A choice of a chunk (`message`: the worker's message it carries) or, without `content`, of the response."""
        message = message or self.last[index]
        finish = message["finish_reason"] if message else None
        if self.job.kind == "chat":
            body = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
        else:
            body = {"index": index, "text": content.get("content", ""), "logprobs": None, "finish_reason": finish}
        if message and self.job.return_token_ids:
            body["token_ids"] = message["token_ids"]
        if finish:
            body["cllm"] = self.stats(message)
        return body

    def chunk(self, choices: list[dict], usage: dict | None = None, cllm: dict | None = None) -> dict:
        kind = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.routes.settings.model_name}
        body |= {"choices": choices, "usage": usage}
        return body | ({"cllm": cllm} if cllm else {})

    def response(self) -> dict:
        choices = []
        for index, (text, message) in enumerate(zip(self.texts, self.last)):
            choice = {"index": index, "logprobs": None, "finish_reason": message["finish_reason"]}
            if self.job.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            if self.job.return_token_ids:
                choice["token_ids"] = self.tokens[index]
            choices.append(choice | {"cllm": self.stats(message)})
        kind = "chat.completion" if self.job.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.routes.settings.model_name}
        return body | {"choices": choices, "usage": self.usage(), "cllm": self.totals()}


async def settle(reply: Reply, work) -> Response | None:
    """Await `work` for `reply`: None when it went through; when it raised an APIError, the reply closed with its
    status and the OpenAI-style error response; a client that left closes it as 499 (and the cancellation goes on)."""
    try:
        await work
    except APIError as err:
        reply.close(err.status)
        return JSONResponse(without_status(err.body), status_code=err.status)
    except (Disconnected, asyncio.CancelledError):
        reply.close(499)
        raise
    return None


async def drain(messages) -> None:
    async for _ in messages:
        pass


def without_status(body: dict) -> dict:
    return {"error": body["error"]}


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"

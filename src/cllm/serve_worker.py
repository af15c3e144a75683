"""The inference worker of `cllm serve`: a LitServe API whose loop makes one decoding pass per turn.

LitServe's own loops hand `predict` a finished batch and wait for its longest row. `DecodeLoop` instead owns the
schedule: each turn it reads the request queue without blocking (new rows, cancellations from clients that left),
admits rows while the batch has room (continuous) or once it is empty (static), makes one `StepDecoder` pass and sends
every row the text that pass committed. Requests are encoded here (the worker holds the tokenizer); one that cannot be
decoded (over the context, no tokens) is answered with an OpenAI-style 400 at once, and a failing pass fails only the
rows in it: the worker lives on.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from queue import Empty

import litserve as ls
from litserve.loops.base import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from cllm.data_modules.prompts import check_context, encode_prompt
from cllm.errors import UserError
from cllm.generate import load_for_decoding
from cllm.models import context_length, eos_ids
from cllm.sampling import SamplingSettings
from cllm.serve_api import OpenAIRoutes
from cllm.serve_engine import StepDecoder
from cllm.serve_requests import APIError, error_body
from cllm.serve_text import TextStream

logger = logging.getLogger(__name__)
SENTINEL = (None, None, None, None)  # what LitServe puts in the queue to stop a worker


class CLLMAPI(ls.LitAPI):
    """The model, its tokenizer and the step decoder, set up once in the worker process."""

    def __init__(self, settings) -> None:  # a `cllm.serve.ServeSettings` (imported there, not here: no circle)
        super().__init__(max_batch_size=settings.max_batch_size, spec=OpenAIRoutes(settings), loop=DecodeLoop())
        self.settings = settings

    def setup(self, device) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the main process shuts us down
        exit_with_parent()
        settings = self.settings
        self.model, self.tokenizer = load_for_decoding(settings.as_decoding())
        self.model.eval()
        self.context_length = context_length(self.model)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.engine = StepDecoder(
            self.model,
            n=settings.block_size,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
            init=settings.init,
            seed=settings.seed,
            candidates=settings.pool_candidates,
            pool_size=settings.pool_size,
            ngram=settings.ngram,
        )
        self.warm_up()

    def warm_up(self) -> None:
        """Two short decodes (batch of one, then of two), so the first request does not pay for lazy init."""
        start = time.perf_counter()
        ids = encode_prompt(self.tokenizer, "Hello", chat_template=False)
        for batch in (1, 2):
            self.engine.add([(("warm-up", i), ids, 4) for i in range(batch)])
            while self.engine.rows:
                self.engine.step()
        print(f"cllm serve: warm in {time.perf_counter() - start:.1f} s; ready", file=sys.stderr, flush=True)

    def encode(self, payload: dict) -> list[int]:
        """Token ids of a request row: chat messages through the chat template, a completion prompt as it is."""
        if payload["kind"] == "completion":
            prompt = payload["prompt"]
            ids = list(prompt) if isinstance(prompt, list) else encode_prompt(self.tokenizer, prompt, False)
        else:
            ids = self.encode_messages(payload["messages"])
        if not ids:
            raise UserError("the prompt encodes to no tokens")
        if not all(0 <= token < self.vocab_size for token in ids):  # else the whole batch's pass fails
            raise UserError(f"prompt token ids must be in [0, {self.vocab_size}), the model's vocabulary")
        try:
            check_context(ids, payload["max_tokens"], self.context_length, "the request")
        except UserError as err:
            raise APIError(400, str(err), "max_tokens", "context_length_exceeded") from None
        return ids

    def encode_messages(self, messages: list[dict]) -> list[int]:
        if self.settings.chat_template and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
        if len(messages) == 1 and messages[0]["role"] == "user":  # what `cllm generate` does without a template
            return encode_prompt(self.tokenizer, messages[0]["content"], chat_template=False)
        raise UserError(
            "this model's tokenizer has no chat template (or --no_chat_template is set), so a chat must be one "
            "user message; send one or use /v1/completions"
        )

    def predict(self, x):  # LitServe requires one; DecodeLoop drives the engine itself
        raise NotImplementedError


class Request:
    """A row in the worker: where its answers go, its text stream, and (once admitted) its prompt ids."""

    def __init__(
        self, response_queue_id: int, ids: list[int], payload: dict, stream: TextStream, sampling=None
    ) -> None:
        self.response_queue_id, self.ids, self.payload, self.stream = response_queue_id, ids, payload, stream
        self.sampling = sampling  # a `cllm.sampling.SamplingSettings`


class DecodeLoop(LitLoop):
    """One turn: read the queue, admit, one pass, answer (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[str, Request] = {}  # encoded, waiting for a row, in arrival order
        self.active: dict[str, Request] = {}

    def run(self, lit_api: CLLMAPI, device, worker_id, request_queue, transport, workers_setup_status, callbacks):
        engine = lit_api.engine
        self.read(lit_api, request_queue, transport, block=not engine.rows and not self.pending)
        room = lit_api.max_batch_size - len(engine)
        if lit_api.settings.batching == "static" and engine.rows:
            room = 0
        admitted = list(self.pending)[: max(room, 0)]
        try:
            if admitted:
                rows = [self.pending[uid] for uid in admitted]
                engine.add([(uid, r.ids, r.payload["max_tokens"], r.sampling) for uid, r in zip(admitted, rows)])
                self.active.update((uid, self.pending.pop(uid)) for uid in admitted)
            outputs = engine.step()
        except Exception as err:  # a bug or out of memory: fail the rows of this pass, keep serving
            logger.exception("decoding pass failed")
            failed = list(self.active) + [uid for uid in admitted if uid in self.pending]
            engine.drop([row.key for row in engine.rows])
            for uid in failed:
                request = self.active.pop(uid, None) or self.pending.pop(uid)
                self.answer(transport, uid, request, error_body(500, f"decoding failed: {err}", "server_error"), True)
            return
        batch_rows = len(outputs)
        for output in outputs:
            request = self.active[output.key]
            text, tokens, finish = request.stream.push(output.tokens, output.done)
            row = output.row
            message = {
                "text": text,
                "token_ids": tokens,
                "finish_reason": finish,
                "prompt_tokens": len(request.ids),
                "completion_tokens": len(request.stream.tokens),
                "decode_passes": len(row.accepted_per_pass),
                "recycled_passes": row.recycled_passes,
                "batch_rows": batch_rows,
            }
            self.answer(transport, output.key, request, message)
            if finish:
                del self.active[output.key]
                if not output.done:  # a stop string ended it before EOS or budget
                    engine.drop([output.key])

    def read(self, lit_api: CLLMAPI, request_queue, transport, block: bool) -> None:
        """Take everything queued (waiting up to 0.5 s for the first item when idle)."""
        while True:
            try:
                item = request_queue.get(timeout=0.5) if block else request_queue.get_nowait()
            except Empty:
                return
            block = False
            if item == SENTINEL:
                sys.exit(0)
            response_queue_id, uid, _, payload = item
            if payload.get("cancel"):  # the client left: free its row
                cancelled = payload["cancel"]
                self.pending.pop(cancelled, None)
                if self.active.pop(cancelled, None) is not None:
                    lit_api.engine.drop([cancelled])
                continue
            stream = TextStream(lit_api.tokenizer, payload["stop"], lit_api.eos_ids)
            try:
                ids = lit_api.encode(payload)
                sampling = SamplingSettings(**payload["sampling"])
            except APIError as err:
                self.answer(transport, uid, Request(response_queue_id, [], payload, stream), err.body, True)
                continue
            except UserError as err:
                request = Request(response_queue_id, [], payload, stream)
                self.answer(transport, uid, request, error_body(400, str(err)), True)
                continue
            except Exception as err:  # a chat template that rejects the messages, say
                request = Request(response_queue_id, [], payload, stream)
                self.answer(transport, uid, request, error_body(400, f"cannot encode the request: {err}"), True)
                continue
            self.pending[uid] = Request(response_queue_id, ids, payload, stream, sampling)

    def answer(self, transport, uid: str, request: Request, message: dict, error: bool = False) -> None:
        status = LitAPIStatus.ERROR if error else LitAPIStatus.OK
        self.put_response(transport, request.response_queue_id, uid, message, status, LoopResponseType.STREAMING)


def exit_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when the main process dies, even by SIGKILL, so that no
    worker (holding the model) or HTTP server (holding the port) outlives it. Elsewhere: nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        return
    if os.getppid() == 1:  # the main process died before the call
        os.kill(os.getpid(), signal.SIGTERM)

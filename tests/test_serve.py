"""`cllm serve`: the real server in a subprocess, spoken to with the real `openai` client (and raw HTTP for bad
input); its text equals greedy AR's and `cllm generate`'s, token for token. Plus the context limit of every command,
the step decoder against `decode_batched`, and the text stream's stop strings, without a server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import pytest

from cllm.cli import main as cli_main
from cllm.data_modules.prompts import check_context
from cllm.decoders import decode_batched
from cllm.errors import UserError
from cllm.jacobi import DecodeOptions
from cllm.models import eos_ids, load_model
from cllm.serve_engine import StepDecoder
from cllm.serve_text import TextStream

MODEL = "tiny:seed=1,context=512"
SERVER_FLAGS = ["--model", MODEL, "--dtype", "float64", "--n", "4", "--max_batch_size", "8"]
SERVER_FLAGS += ["--max_tokens_limit", "1024", "--max_request_bytes", "20000", "--max_rows_per_request", "4"]
PROMPTS = ["def add(a, b):", "x = 1 + 2 +", "The quick brown fox", "import os\n", "a", "hello world, hi", "[1, 2,", "#"]


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = load_model(MODEL, dtype="float64")

    def greedy(prompt: str, max_new_tokens: int) -> list[int]:
        """Greedy AR (n = 1) of the prompt's plain encoding: what every decoder must reproduce."""
        ids = tokenizer(prompt)["input_ids"]
        options = DecodeOptions(n=1, max_new_tokens=max_new_tokens, eos_token_id=eos_ids(model, tokenizer))
        return decode_batched(model, [ids], batch_size=1, options=options).tokens[0]

    greedy.tokenizer = tokenizer
    greedy.text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    greedy.model = model
    return greedy


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "cllm", "serve", *SERVER_FLAGS, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    process.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"cllm serve exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("cllm serve was not healthy within 240 s")
    process.url, process.port = url, port
    yield process
    if process.poll() is None:  # a test failed before the SIGTERM test: stop it the clean way, then make sure
        import psutil

        family = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        for child in psutil.wait_procs(family, timeout=30)[1]:
            child.kill()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


@pytest.mark.slow
def test_chat_and_completion_equal_generate_and_greedy(client, reference, capsys):
    prompt, budget = PROMPTS[0], 24
    expected = reference(prompt, budget)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=budget,
        extra_body={"return_token_ids": True},
    )
    completion = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=budget, extra_body={"return_token_ids": True}
    )
    code = None
    try:
        cli_main(
            [
                "generate",
                "--model",
                MODEL,
                "--dtype",
                "float64",
                "--n",
                "4",
                "--prompt",
                prompt,
                "--max-new-tokens",
                str(budget),
            ]
        )
    except SystemExit as stop:
        code = stop.code
    generated = capsys.readouterr().out
    assert code is None
    generated_text = generated[: generated.rindex("\n[jacobi n=4]")]
    assert generated_text == chat.choices[0].message.content == completion.choices[0].text
    for choice, text in (
        (chat.choices[0], chat.choices[0].message.content),
        (completion.choices[0], completion.choices[0].text),
    ):
        assert token_ids(choice) == expected
        assert text == reference.text(expected)
        assert choice.finish_reason == "length"
    prompt_tokens = len(reference.tokenizer(prompt)["input_ids"])
    for response in (chat, completion):
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, budget)
        assert response.usage.total_tokens == prompt_tokens + budget
        stats = response.model_extra["cllm"]
        assert stats["decoder"] == "jacobi" and stats["n"] == 4 and 1 <= stats["decode_passes"] <= budget
        assert stats["accepted_tokens_per_pass"] == pytest.approx(budget / stats["decode_passes"], abs=1e-3)


@pytest.mark.slow
def test_streaming_sends_one_delta_per_pass_that_join_to_the_text(client, reference):
    prompt, budget = PROMPTS[1], 30
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=budget
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=budget, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.role is None]
    usages = [c.usage for c in chunks if c.usage is not None]
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    assert len(content) == whole.model_extra["cllm"]["decode_passes"]  # one chunk per decoding pass
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert len(usages) == 1 and usages[0].completion_tokens == budget == whole.usage.completion_tokens
    assert usages[0].prompt_tokens == whole.usage.prompt_tokens
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=budget, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reference.text(reference(prompt, budget))


@pytest.mark.slow
def test_stop_string_cuts_the_text_and_says_stop(client, reference):
    prompt = PROMPTS[2]
    tokens = reference(prompt, 40)
    text = reference.text(tokens)
    at = next(i for i in range(6, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[at : at + 2]
    cut = text.index(stop)
    counted = next(k for k in range(1, len(tokens) + 1) if stop in reference.text(tokens[:k]))
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=[stop, "never-seen"])
    assert whole.choices[0].text == text[:cut] and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == counted
    stream = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in stream) == text[:cut]
    assert stream[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_n_choices_and_prompt_lists(client, reference):
    response = client.completions.create(model=MODEL, prompt=[PROMPTS[3], PROMPTS[4]], n=2, max_tokens=8)
    assert len(response.choices) == 4
    for index, choice in enumerate(response.choices):
        expected = reference(PROMPTS[3 + index // 2], 8)
        assert choice.index == index and choice.text == reference.text(expected)
    prompt_tokens = sum(len(reference.tokenizer(p)["input_ids"]) for p in PROMPTS[3:5])
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 32)


@pytest.mark.slow
def test_sampled_requests_draw_what_decode_batched_draws_with_their_seed(client, reference):
    from cllm.sampling import SamplingSettings

    prompt, budget = PROMPTS[5], 20
    ids = reference.tokenizer(prompt)["input_ids"]

    def expected(seed: int) -> list[int]:
        options = DecodeOptions(n=4, max_new_tokens=budget, eos_token_id=eos_ids(reference.model, reference.tokenizer))
        sampling = SamplingSettings(temperature=0.9, top_k=20, top_p=0.95, seed=seed)
        return decode_batched(
            reference.model, [ids], batch_size=1, options=replace(options, seed=seed), sampling=sampling
        ).tokens[0]

    request = dict(model=MODEL, prompt=prompt, max_tokens=budget, temperature=0.9, top_p=0.95, seed=11)
    reply = client.completions.create(**request, n=2, extra_body={"top_k": 20, "return_token_ids": True})
    assert [token_ids(c) for c in reply.choices] == [expected(11), expected(12)]  # choice j: seed + j
    streamed = client.completions.create(**request, stream=True, extra_body={"top_k": 20})
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


@pytest.mark.slow
def test_eight_concurrent_requests_equal_their_single_request_outputs(client, reference):
    budgets = [5, 40, 12, 60, 3, 25, 50, 9]
    results: dict[int, tuple[str, list[int] | None]] = {}

    def ask(i: int) -> None:
        if i % 2:  # streaming, text only
            stream = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=budgets[i], stream=True)
            results[i] = ("".join(c.choices[0].text for c in stream), None)
        else:
            reply = client.completions.create(
                model=MODEL, prompt=PROMPTS[i], max_tokens=budgets[i], extra_body={"return_token_ids": True}
            )
            results[i] = (reply.choices[0].text, token_ids(reply.choices[0]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for i in range(8):
        expected = reference(PROMPTS[i], budgets[i])
        text, ids = results[i]
        assert text == reference.text(expected), i
        assert ids in (None, expected), i


@pytest.mark.slow
def test_bad_requests_answer_4xx_and_the_server_serves_on(client, server):
    import openai

    url = f"{server.url}/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    raw = httpx.post(url, content=b'{"model": "x",', headers={"content-type": "application/json"}, timeout=30)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    big = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 30000}]}, timeout=30)
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
    cases = [
        (openai.NotFoundError, dict(model="gpt-4", messages=user), "not served here"),
        (openai.BadRequestError, dict(model=MODEL, messages=[]), "messages"),
        (openai.BadRequestError, dict(model=MODEL, messages=user, max_tokens=600), "context of 512"),
        (openai.BadRequestError, dict(model=MODEL, messages=user, max_tokens=5000), "limit of 1024"),
        (openai.BadRequestError, dict(model=MODEL, messages=user, temperature=3), "less than or equal to 2"),
        (openai.BadRequestError, dict(model=MODEL, messages=user, n=5), "limit of 4"),
        (openai.BadRequestError, dict(model=MODEL, messages=user + user), "chat template"),
        (openai.BadRequestError, dict(model=MODEL, messages=user, max_tokens=600, stream=True), "context of 512"),
    ]
    for error, request, message in cases:
        with pytest.raises(error, match=message):
            reply = client.chat.completions.create(**request)
            list(reply) if request.get("stream") else None
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=MODEL, prompt=[5, 10**6], max_tokens=2)
    after = client.chat.completions.create(model=MODEL, messages=user, max_tokens=3)
    assert after.usage.completion_tokens == 3 and after.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_a_client_that_leaves_frees_its_row(client, server):
    body = {"model": MODEL, "prompt": "leaving", "max_tokens": 480, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while 'status="499"' not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.2)
    client.completions.create(model=MODEL, prompt="next", max_tokens=4)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "cllm_batch_rows 1\n" in metrics and "cllm_requests_in_flight 0\n" in metrics


@pytest.mark.slow
def test_models_health_and_metrics(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "cllm_requests_total{",
        "cllm_completion_tokens_total",
        "cllm_decode_passes_total",
        "cllm_accepted_tokens_per_pass",
        "cllm_request_latency_seconds_bucket",
        "cllm_time_to_first_token",
    ):
        assert name in metrics.text  # fmt: skip


@pytest.mark.slow
def test_sigterm_leaves_no_process_behind(server):
    import psutil

    family = [server.pid] + [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
    assert len(family) >= 3  # this process, the HTTP server, the decoding worker (and the queue manager)
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0 or server.returncode in (-signal.SIGTERM, 1)
    _, alive = psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)], timeout=30)
    assert not [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert "Traceback" not in server.log.read_text()


def test_every_command_refuses_a_budget_past_the_context(capsys):
    with pytest.raises(UserError, match="more than the model's context of 512"):
        check_context([1] * 12, 501, 512, "--prompt")
    check_context([1] * 12, 500, 512)
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        cli_main(["generate", "--model", MODEL, "--prompt", "hi", "--max_new_tokens", "100000000"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and "context of 512" in err
    assert time.monotonic() - start < 60


def test_step_decoder_equals_decode_batched_as_rows_come_and_go(reference):
    model, tokenizer = reference.model, reference.tokenizer
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    budgets = [12, 5, 20, 8]
    for candidates in (0, 2):
        options = DecodeOptions(n=4, eos_token_id=eos_ids(model, tokenizer))
        decoder = "recycle" if candidates else "jacobi"
        expected = [
            decode_batched(model, [p], batch_size=1, decoder=decoder, options=options, max_new_tokens=b)
            for p, b in zip(prompts, budgets)
        ]
        engine = StepDecoder(model, n=4, eos_token_id=options.eos_token_id, pad_token_id=0, candidates=candidates)
        engine.add([(0, prompts[0], budgets[0]), (1, prompts[1], budgets[1])])
        tokens, passes, turn = {}, {}, 0
        while engine.rows or turn < 3:
            if turn == 2:  # two rows join a running batch (continuous batching)
                engine.add([(2, prompts[2], budgets[2]), (3, prompts[3], budgets[3])])
            for output in engine.step():
                tokens.setdefault(output.key, []).extend(output.tokens)
                passes[output.key] = len(output.row.accepted_per_pass)
            turn += 1
        assert [tokens[k] for k in range(4)] == [r.tokens[0] for r in expected]
        assert [passes[k] for k in range(4)] == [r.forward_passes[0] for r in expected]  # own guesses: same passes


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    stream = TextStream(ByteTokenizer(), ["END"], eos_ids=[256])
    euro = list("€".encode())
    deltas = [stream.push(list(b"ab") + euro[:1], False), stream.push(euro[1:] + list(b"xE"), False)]
    assert [d[0] for d in deltas] == ["ab", "€x"]  # the partial euro sign, then the "E" that may start END
    text, counted, finish = stream.push(list(b"NDzz"), False)
    assert (text, finish, stream.tokens[-1]) == ("", "stop", ord("D"))
    assert counted == list(b"ND")
    eos = TextStream(ByteTokenizer(), [], eos_ids=[256])
    assert eos.push(list(b"hi") + [256], True) == ("hi", list(b"hi") + [256], "stop")
    assert TextStream(ByteTokenizer(), [], [256]).push(list(b"hi"), True)[2] == "length"
    assert json.dumps(stream.sent) == '"ab\\u20acx"'


def test_passes_that_queued_up_stream_as_one_chunk_each():
    """Two passes of one row read in one wake-up (a busy server, a slow client) go out as two chunks, each with a
    single choice: clients read `chunk.choices[0]`, so a chunk with two deltas of one choice loses the second."""
    import asyncio
    from types import SimpleNamespace

    from cllm.serve_api import OpenAIRoutes, Reply

    def message(text: str, finish: str | None) -> dict:
        counts = {"prompt_tokens": 2, "completion_tokens": 2, "decode_passes": 2, "recycled_passes": 0}
        return {"text": text, "token_ids": [ord(text)], "finish_reason": finish, "batch_rows": 1} | counts

    reply = object.__new__(Reply)
    settings = SimpleNamespace(model_name="m", decoder="jacobi", block_size=4)
    reply.routes, reply.id, reply.created, reply.uids = SimpleNamespace(settings=settings), "cmpl-x", 0, ["u"]
    reply.job = SimpleNamespace(kind="completion", include_usage=False, return_token_ids=True, n=1)
    reply.last = [None]
    reply.close = lambda status: None

    async def messages():
        batch = [(0, message("Y", None)), (0, message("Z", "length"))]
        reply.last = [batch[-1][1]]
        yield batch

    reply.messages = messages

    async def collect() -> list[str]:
        return [event async for event in OpenAIRoutes.events(None, reply)]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert [[c["text"] for c in chunk["choices"]] for chunk in chunks] == [["Y"], ["Z"]]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, "length"]
    assert ["cllm" in chunk for chunk in chunks] == [False, True]  # the request's totals with the last chunk only

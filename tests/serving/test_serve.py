"""serve.py with the official `openai` client against a real server on 127.0.0.1, on a tiny model
with three adapters (with their own turn-marker rows) on one copy of the base: both endpoints, streaming,
batching of concurrent requests for different adapters, bad input, a client that goes away mid-stream,
the bounded queue."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

import serve
from conftest import build_tiny_model, make_tiny_tokenizer
from gemma.chat_format import extract_code, user_turn
from gemma.generation import GenerationSettings, Generator
from lora import AdapterError, LoRAConfig, inject_lora, save_adapter
from lora import inject_trainable_tokens
from serving import app
from serving.batcher import BatchScheduler, Job, QueueFull
from serving.models import load_models, memory_report

CONTEXT = 256  # the tiny model's context, so that a prompt can be too long for it


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    model = build_tiny_model("gemma3")
    model.config.max_position_embeddings = CONTEXT
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    adapters = {}
    # Adapters of different ranks and targets; two with trained turn-marker rows (ids 4 and 5), one without.
    configs = {"alpha": LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"),
                                   trainable_token_indices=[4, 5]),
               "beta": LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj")),
               "delta": LoRAConfig(rank=2, alpha=2.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                   trainable_token_indices=[4, 5])}
    for seed, (name, config) in enumerate(configs.items(), 1):
        adapted = build_tiny_model("gemma3")
        inject_lora(adapted, config)
        if config.trainable_token_indices:
            inject_trainable_tokens(adapted, config.trainable_token_indices)
        torch.manual_seed(seed)
        for parameter_name, parameter in adapted.named_parameters():
            if "lora_B" in parameter_name:
                parameter.data.normal_(0, 2.0)
            elif "trainable_tokens_delta" in parameter_name:  # moved off the base rows, not so far that every answer ends at once
                parameter.data.add_(torch.randn_like(parameter), alpha=0.05)
        adapters[name] = tmp_path_factory.mktemp(name)
        save_adapter(adapted, adapters[name], config)
    return folder, adapters


class Running:
    """A server on a free port in a thread, stopped at teardown."""

    def __init__(self, models: dict, limits: app.ServerLimits = app.ServerLimits(), **scheduler_options):
        self.scheduler = BatchScheduler(models, **scheduler_options)
        self.scheduler.start()
        sock = app.listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = app.Server(self.scheduler, limits)
        self.http = app.http_server(app.create_app(self.server), log_level="warning")
        self.thread = threading.Thread(target=self.http.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.http.started:
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)

    def stop(self) -> None:
        self.http.should_exit = True
        self.thread.join(timeout=10)
        self.scheduler.stop()

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                ) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())


MODELS = ["base", "alpha", "beta", "delta"]


@pytest.fixture(scope="module")
def models(model_and_adapters):
    folder, adapters = model_and_adapters
    return load_models(str(folder), adapters, "cpu")


@pytest.fixture(scope="module")
def alone(model_and_adapters) -> dict[str, Generator]:
    """Each model on its own copy of the base, as a single adapter is loaded (generate.py): the reference."""
    folder, adapters = model_and_adapters
    return {"base": Generator.load(str(folder), device="cpu"),
            **{name: Generator.load(str(folder), str(adapter), "cpu") for name, adapter in adapters.items()}}


@pytest.fixture(scope="module")
def server(models):
    running = Running(models, max_batch=8, gather_seconds=0.1)
    yield running
    running.stop()


def direct(alone, model: str, prompt: str, max_tokens: int) -> str:
    """What the model's own Generator (gemma/generation.py) writes for the prompt alone."""
    return alone[model].complete([prompt], GenerationSettings(max_new_tokens=max_tokens))[0].text


def test_the_models_are_listed_and_health_says_ok(server):
    assert [model.id for model in server.client.models.list().data] == MODELS
    health = server.health()
    assert health["status"] == "ok" and health["models"] == MODELS


def test_the_adapters_share_one_copy_of_the_base(server, models):
    memory = server.health()["memory"]
    assert memory["base_copies"] == 1 and memory["adapters"] == 3
    assert len({id(served.generator.model) for served in models.values()}) == 1
    # alpha and beta: r=4 on q and v (2 layers); delta: r=2 on q, k, v, o; alpha and delta: two 64-wide rows
    q_v = 2 * 4 * ((64 + 64) + (64 + 16))
    q_k_v_o = 2 * 2 * ((64 + 64) + (64 + 16) + (64 + 16) + (64 + 64))
    assert memory["adapters_mib"] == round(4 * (2 * q_v + q_k_v_o + 2 * 2 * 64) / 2**20, 2)


def test_chat_answers_are_the_generator_s_and_carry_the_code(server, alone):
    messages = [{"role": "user", "content": "Write fib"}]
    answers = {}
    for model in MODELS:
        response = server.client.chat.completions.create(model=model, messages=messages, max_tokens=12)
        choice = response.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == direct(alone, model, user_turn("Write fib"), 12)
        assert choice.message.model_extra["code"] == extract_code(choice.message.content)
        assert choice.finish_reason in ("stop", "length")
        assert response.usage.prompt_tokens == len(alone[model].tokenizer(user_turn("Write fib")).input_ids)
        answers[model] = choice.message.content
    assert len(set(answers.values())) == 4  # each adapter answers with its own weights


def test_completions_take_a_list_of_prompts(server, alone):
    prompts = ["def add(a, b):\n", "x = "]
    response = server.client.completions.create(model="alpha", prompt=prompts, max_tokens=10)
    assert [choice.index for choice in response.choices] == [0, 1]
    assert [choice.text for choice in response.choices] == [direct(alone, "alpha", p, 10) for p in prompts]
    assert response.usage.completion_tokens <= 20


def test_streaming_gives_the_same_text_piece_by_piece(server):
    messages = [{"role": "user", "content": "Sort a list"}]
    whole = server.client.chat.completions.create(model="beta", messages=messages, max_tokens=16)
    chunks = list(server.client.chat.completions.create(model="beta", messages=messages, max_tokens=16, stream=True))
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = server.client.completions.create(model="base", prompt="def f(", max_tokens=8, stream=True)
    text = "".join(chunk.choices[0].text for chunk in streamed)
    assert text == server.client.completions.create(model="base", prompt="def f(", max_tokens=8).choices[0].text


def test_a_stop_string_ends_the_answer_and_is_never_streamed(server):
    prompt = "def add(a, b):\n"
    plain = server.client.completions.create(model="base", prompt=prompt, max_tokens=16).choices[0].text
    stop = plain[4:6]  # a piece of what the model writes anyway
    cut = server.client.completions.create(model="base", prompt=prompt, max_tokens=16, stop=[stop])
    streamed = "".join(chunk.choices[0].text for chunk in server.client.completions.create(
        model="base", prompt=prompt, max_tokens=16, stop=[stop], stream=True))
    assert stop and cut.choices[0].text == plain.split(stop)[0] == streamed
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, alone):
    instructions = [f"Write function number {index}" for index in range(6)]
    before = server.health()

    def ask(instruction: str) -> str:
        response = server.client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": instruction}], max_tokens=10)
        return response.choices[0].message.content

    with ThreadPoolExecutor(len(instructions)) as pool:
        answers = list(pool.map(ask, instructions))
    after = server.health()
    assert answers == [direct(alone, "alpha", user_turn(text), 10) for text in instructions]
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6 and after["largest_batch"] > 1


def test_requests_for_different_adapters_share_a_batch_and_each_gets_its_adapter_s_answer(server, alone):
    """Twelve requests sent together, three for each model: one batch of mixed rows, and every answer is
    the one its model gives alone (its LoRA weights and its own turn-marker rows, at both ends)."""
    asks = [(MODELS[index % 4], f"Write function number {index}") for index in range(12)]
    before = server.health()

    def ask(model_and_text: tuple[str, str]) -> str:
        model, text = model_and_text
        response = server.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=12)
        return response.choices[0].message.content

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, asks))
    after = server.health()
    assert answers == [direct(alone, model, user_turn(text), 12) for model, text in asks]
    assert after["batches"] - before["batches"] <= 3 and after["largest_batch"] == 8  # --max-batch 8, mixed
    assert len(set(answers)) > 4



@pytest.mark.parametrize("body, status, message", [
    (b'{"model": "base", "messages": [', 400, "not valid JSON"),
    (b'{"model": "gamma", "messages": [{"role": "user", "content": "x"}]}', 404, "model 'gamma' does not exist"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 250}', 400,
     "passes the model's context of 256 tokens"),
    (b'{"model": "base", "messages": [{"role": "assistant", "content": "x"}]}', 400, "must end with a user message"),
    (b'{"model": "base", "messages": [{"role": "robot", "content": "x"}]}', 400, "messages.0.role"),
    (b'{"model": "base", "messages": []}', 400, "messages"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n: "),
    (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "top_p": 5}', 400, "top_p"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', 400,
     "at most 4"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "seed": 1180591620717411303424}', 400,
     "seed"),
    (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "seed": -1}', 400, "seed"),
])
def test_bad_requests_get_a_json_error_not_a_crash(server, body, status, message):
    code, answer = server.request("POST", "/v1/chat/completions", body)
    assert code == status
    assert message in answer["error"]["message"] and "\n" not in answer["error"]["message"]
    assert server.health()["status"] == "ok"


def test_the_openai_client_sees_the_errors_as_its_own_exceptions(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.completions.create(model="gamma", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.completions.create(model="base", prompt="x" * 300, max_tokens=1)


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "not-streaming"])
def test_a_client_that_goes_away_frees_its_row(server, stream):
    LONG = 150
    prompt = "def loop():\n"
    full = server.client.completions.create(model="base", prompt=prompt, max_tokens=LONG)
    assert full.usage.completion_tokens == LONG  # the precondition: this answer runs to its limit
    before = server.health()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": "base", "prompt": prompt, "max_tokens": LONG, "stream": stream})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
    else:
        time.sleep(0.3)  # queued or generating: no answer comes before the whole of it
    connection.sock.shutdown(socket.SHUT_RDWR)  # gone at once (a plain close waits for the response's file)
    deadline = time.monotonic() + 30
    while server.health()["batches"] == before["batches"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = server.health()
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["new_tokens"] - before["new_tokens"] < LONG


def test_requests_beyond_the_queue_bound_get_429(models):
    blocked = BatchScheduler(models, max_queued=1)  # never started: what is queued stays queued
    blocked.submit([Job("base", "x", GenerationSettings(), (), on_done=lambda result: None)])
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        blocked.submit([Job("base", "y", GenerationSettings(), (), on_done=lambda result: None)])
    full = Running(models, max_queued=1)
    try:
        with pytest.raises(openai.RateLimitError, match="the server is busy"):
            full.client.completions.create(model="base", prompt=["a", "b"], max_tokens=2)
    finally:
        full.stop()


def test_adapter_names_on_the_command_line(tmp_path):
    assert serve.parse_adapters(["lora=outputs/x", "outputs/qlora_r16"], tmp_path) == {
        "lora": Path("outputs/x"), "qlora_r16": Path("outputs/qlora_r16")}
    for specs in (["base=x"], ["a=x", "a=y"]):
        with pytest.raises(AdapterError, match="its own name"):
            serve.parse_adapters(specs, tmp_path)


def test_a_port_in_use_is_one_line_and_exit_2(model_and_adapters, capsys):
    taken = app.listen("127.0.0.1", 0)
    port = taken.getsockname()[1]
    folder, _ = model_and_adapters
    assert serve.main(["--model", str(folder), "--adapter", "none=/no/adapter", "--port", str(port)]) == 2
    assert "serve.py: error: no adapter_config.json in /no/adapter" in capsys.readouterr().err
    assert serve.main(["--model", str(folder), "--outputs", "/nowhere", "--port", str(port)]) == 2
    assert f"serve.py: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    taken.close()


# ---------------------------------------------------------------------------------------------
# Limits and faults


@pytest.fixture(scope="module")
def limited(models):
    running = Running(models, app.ServerLimits(max_tokens=40, max_prompt_tokens=30, max_body_bytes=600))
    yield running
    running.stop()


def chat_body(content: str, **options) -> bytes:
    return json.dumps({"model": "base", "messages": [{"role": "user", "content": content}], **options}).encode()


@pytest.mark.parametrize("body, headers, status, message", [
    (chat_body("x", max_tokens=41), {}, 400, "max_tokens 41 is more than this server allows (40)"),
    (chat_body("y" * 100), {}, 400, "more than this server allows (30)"),
    (chat_body("z" * 600), {}, 413, "larger than this server allows (600 bytes)"),
    (chat_body("x"), {"Transfer-Encoding": "chunked"}, 411, "needs a Content-Length"),
])
def test_each_limit_is_a_4xx_in_openai_s_error_shape(limited, body, headers, status, message):
    if "Transfer-Encoding" in headers:  # http.client then sends the body in chunks, without a length
        connection = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=30)
        connection.request("POST", "/v1/chat/completions", body=iter([body]), headers=headers)
        response = connection.getresponse()
        code, answer = response.status, json.loads(response.read())
    else:
        code, answer = limited.request("POST", "/v1/chat/completions", body)
    assert code == status and message in answer["error"]["message"]
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert limited.request("POST", "/v1/chat/completions", chat_body("x", max_tokens=4))[0] == 200


def test_prompts_are_tokenized_off_the_event_loop(limited, monkeypatch):
    threads = []
    tokenize = type(limited.server.tokenizer).__call__

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return tokenize(self, *args, **kwargs)

    monkeypatch.setattr(type(limited.server.tokenizer), "__call__", recording)
    assert limited.request("POST", "/v1/chat/completions", chat_body("x", max_tokens=2))[0] == 200
    assert "tokenizer_0" in threads and limited.thread.name not in threads  # not the event loop's thread


def test_streaming_decodes_only_the_newest_tokens(server, models, monkeypatch):
    """The stream's text is the answer's, and decoding it costs about as many tokens as it has, not their square."""
    tokenizer = models["base"].generator.tokenizer
    decoded = []
    decode = type(tokenizer).decode

    def counting(self, ids, *args, **kwargs):
        decoded.append(len(ids))
        return decode(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "decode", counting)
    LONG = 120
    chunks = list(server.client.completions.create(model="base", prompt="def loop():\n", max_tokens=LONG, stream=True))
    text = "".join(chunk.choices[0].text for chunk in chunks)
    monkeypatch.undo()
    assert text == server.client.completions.create(model="base", prompt="def loop():\n", max_tokens=LONG).choices[0].text
    # A few tokens per decode (more while a random model's bytes end mid-character), the whole answer once at the
    # end; decoding the whole answer at every token would take 1 + 2 + ... + 120 = 7,260.
    assert sum(decoded) < 2_500


def test_a_dead_worker_fails_health_and_every_request_at_once(models, monkeypatch):
    running = Running(models)
    try:
        def die(*args, **kwargs):
            raise SystemExit("the worker thread ends")

        monkeypatch.setattr(models["base"].generator, "generate_batch", die)
        code, answer = running.request("POST", "/v1/chat/completions", chat_body("x", max_tokens=4))
        assert code == 503 and "batch worker has stopped" in answer["error"]["message"]
        running.scheduler._thread.join(timeout=10)
        code, health = running.request("GET", "/health")
        assert code == 503 and health["status"] == "the batch worker has stopped"
        started = time.monotonic()
        code, answer = running.request("POST", "/v1/chat/completions", chat_body("x", max_tokens=4))
        assert code == 503 and time.monotonic() - started < 2
    finally:
        monkeypatch.undo()
        running.stop()


def test_a_failing_callback_does_not_strand_the_batch_s_other_requests(models):
    scheduler = BatchScheduler(models, gather_seconds=0.1)
    results = {}
    done = threading.Event()

    def broken(result):
        raise RuntimeError("this client's callback fails")

    def keep(result):
        results["second"] = result
        done.set()

    settings = GenerationSettings(max_new_tokens=3)
    scheduler.submit([Job("base", "a", settings, (), on_done=broken), Job("base", "b", settings, (), on_done=keep)])
    scheduler.start()
    try:
        assert done.wait(30) and results["second"].new_tokens >= 1
        assert scheduler.stats.largest_batch == 2  # both in one batch: the first's failure came first
        assert not scheduler.worker_stopped()
    finally:
        scheduler.stop()


def test_a_qlora_adapter_is_served_on_an_nf4_copy_of_the_base(model_and_adapters, tmp_path, alone):
    """LoRA adapters share the float base; a QLoRA adapter (recorded by train.py) gets the NF4 base it was trained
    on, and answers as it does alone (generate.py's loading)."""
    folder, adapters = model_and_adapters
    qlora = tmp_path / "qlora"
    shutil.copytree(adapters["alpha"], qlora)
    (qlora / "train_config.json").write_text(json.dumps({"qlora": True}))
    models = load_models(str(folder), {"alpha": adapters["alpha"], "qlora": qlora}, "cpu")
    assert memory_report(models)["base_copies"] == 2
    assert models["alpha"].generator is models["base"].generator is not models["qlora"].generator
    settings = GenerationSettings(max_new_tokens=8)
    for name, reference in (("alpha", alone["alpha"]), ("qlora", Generator.load(str(folder), str(qlora), "cpu"))):
        served = models[name]
        with served.adapters.selected([served.slot]):
            answer = served.generator.complete([user_turn("Write fib")], settings)[0].text
        assert answer == reference.complete([user_turn("Write fib")], settings)[0].text

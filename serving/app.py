"""The OpenAI-compatible HTTP app: request validation and limits, the completion and chat endpoints
(streamed with server-sent events or not), /v1/models and /health, over a BatchScheduler that generates
requests arriving together as one batch, whatever adapters they ask for.

One slow request must not hold the server: a request's body, prompt and max_tokens are bounded (ServerLimits),
prompts are tokenized off the event loop, and a client that goes away, streaming or not, frees its row."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gemma.chat_format import conversation, extract_code
from gemma.generation import Completion, GenerationSettings
from serving.batcher import BatchScheduler, Job, QueueFull, WorkerStopped
from serving.models import memory_report

DEFAULT_MAX_TOKENS = GenerationSettings.max_new_tokens
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerLimits:
    """The most one request may ask for (serve.py's --max-tokens-limit, --max-prompt-tokens, --max-body-bytes)."""

    max_tokens: int = 2048  # new tokens per answer
    max_prompt_tokens: int = 4096  # per prompt
    max_body_bytes: int = 1 << 20

# ---------------------------------------------------------------------------------------------
# Requests (anything OpenAI's clients send that we do not use is ignored)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise BadRequest("stop: at most 4 non-empty strings")
        return tuple(stops)

    def token_limit(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]

    def prompts(self) -> list[str]:
        if not self.prompt:
            raise BadRequest("prompt: give a string or a non-empty list of strings")
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class BadRequest(ValueError):
    """A request the server cannot answer; the message is one line for the client."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def error_response(message: str, status: int, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


# ---------------------------------------------------------------------------------------------
# The application


class Server:
    """The models, the batch scheduler, the limits, and a tokenizer of the server's own for counting prompt
    tokens (the worker thread's one is busy generating), used by one thread off the event loop."""

    def __init__(self, scheduler: BatchScheduler, limits: ServerLimits = ServerLimits()):
        self.scheduler, self.limits = scheduler, limits
        any_generator = next(iter(scheduler.models.values())).generator
        self.tokenizer = copy.deepcopy(any_generator.tokenizer)
        self.context = any_generator.model.config.get_text_config().max_position_embeddings
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    async def plan(self, request: _Request, prompts: list[str]) -> tuple[GenerationSettings, int]:
        """plan_now, in the tokenizing thread: a long prompt must not stall the other requests."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, self.plan_now, request, prompts)

    def plan_now(self, request: _Request, prompts: list[str]) -> tuple[GenerationSettings, int]:
        """Check a request against the models, the limits and the context; its generation settings and the
        prompts' tokens in all. Without max_tokens an answer may take 512 tokens, or what the context has left."""
        if request.model not in self.scheduler.models:
            raise BadRequest(f"model {request.model!r} does not exist; this server has "
                             f"{', '.join(self.scheduler.models)}", 404, code="model_not_found")
        request.stop_strings()
        asked = request.token_limit()
        if asked is not None and asked > self.limits.max_tokens:
            raise BadRequest(f"max_tokens {asked} is more than this server allows ({self.limits.max_tokens})")
        counts = [len(self.tokenizer(prompt).input_ids) for prompt in prompts]
        if max(counts) > self.limits.max_prompt_tokens:
            raise BadRequest(f"the prompt is {max(counts)} tokens, more than this server allows "
                             f"({self.limits.max_prompt_tokens})")
        room = self.context - max(counts)
        limit = request.token_limit() or min(DEFAULT_MAX_TOKENS, room)
        if limit > room or room < 1:
            raise BadRequest(f"the prompt is {max(counts)} tokens; with max_tokens {limit} that passes the model's "
                             f"context of {self.context} tokens")
        settings = GenerationSettings(max_new_tokens=limit, temperature=request.temperature, top_p=request.top_p,
                                      seed=request.seed)
        return settings, sum(counts)

    async def run(self, request: _Request, prompts: list[str], settings: GenerationSettings, stream: bool,
                  client_gone: Callable[[], Awaitable[bool]]) -> list[Completion] | AsyncIterator:
        """Queue one job per prompt; the completions, or (stream) an iterator of (index, text | Completion).
        A client that goes away (`client_gone`) before its answers are complete cancels their rows."""
        stop = request.stop_strings()
        loop = asyncio.get_running_loop()
        if stream:
            events: asyncio.Queue = asyncio.Queue()
            jobs = [Job(request.model, prompt, settings, stop,
                        on_done=_threadsafe(loop, lambda result, i=index: events.put_nowait((i, result))),
                        on_text=_threadsafe(loop, lambda text, i=index: events.put_nowait((i, text))))
                    for index, prompt in enumerate(prompts)]
        else:
            futures = [loop.create_future() for _ in prompts]
            jobs = [Job(request.model, prompt, settings, stop, on_done=_threadsafe(loop, _resolver(future)))
                    for prompt, future in zip(prompts, futures)]
        try:
            self.scheduler.submit(jobs)
        except QueueFull as error:
            raise BadRequest(str(error), 429, "rate_limit_error") from None
        except WorkerStopped as error:
            raise BadRequest(str(error), 503, "server_error") from None
        if not stream:
            return await _results_unless_gone(futures, jobs, client_gone)
        return _events(events, jobs)


def _threadsafe(loop: asyncio.AbstractEventLoop, callback):
    """`callback` as the worker thread may call it: run on the server's event loop, if still open."""
    def call(value) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(callback, value)
    return call


def _resolver(future: asyncio.Future):
    def resolve(result: Completion | BaseException) -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    return resolve


async def _results_unless_gone(futures: list[asyncio.Future], jobs: list[Job],
                               client_gone: Callable[[], Awaitable[bool]]) -> list[Completion]:
    """The jobs' completions; if the client goes away first, its jobs are cancelled (their rows end at the
    next step) and nobody is left to answer."""
    pending = set(futures)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S)
        if pending and await client_gone():
            for job in jobs:
                job.cancelled = True
            raise BadRequest("the client closed the connection", 499)
    return [future.result() for future in futures]


async def _events(events: asyncio.Queue, jobs: list[Job]) -> AsyncIterator:
    """(index, text piece) as they come, then (index, Completion) per job; cancels the jobs if the
    consumer stops early (the client disconnected)."""
    remaining = len(jobs)
    try:
        while remaining:
            index, item = await events.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= isinstance(item, Completion)
            yield index, item
    finally:
        for job in jobs:
            job.cancelled = True


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="gemma-code-lora", description="OpenAI-compatible completions from Gemma + LoRA adapters")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response("the request body is not valid JSON", 400)
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error_response(f"{where}: {first.get('msg')}" if where else str(first.get("msg")), 400)

    @app.exception_handler(WorkerStopped)
    async def worker_stopped(_: Request, error: WorkerStopped) -> JSONResponse:
        return error_response(str(error), 503, "server_error")

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, error: BadRequest) -> JSONResponse:
        return error_response(str(error), error.status, error.kind, error.code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        return error_response(f"generation failed: {type(error).__name__}: {error}", 500, "server_error")

    @app.get("/health")
    async def health():
        stats = server.scheduler.stats
        alive = not server.scheduler.worker_stopped()
        body = {"status": "ok" if alive else "the batch worker has stopped", "models": list(server.scheduler.models),
                "queued": server.scheduler.queued(), "batches": stats.batches, "requests": stats.jobs,
                "largest_batch": stats.largest_batch, "new_tokens": stats.new_tokens, "cancelled": stats.cancelled,
                "memory": memory_report(server.scheduler.models)}
        return body if alive else JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "gemma-code-lora"}
                                           for name in server.scheduler.models]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        return await _answer(server, request, request.prompts(), chat=False, client_gone=http.is_disconnected)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        try:
            prompt = conversation([(message.role, message.text()) for message in request.messages])
        except ValueError as error:
            raise BadRequest(f"messages: {error}") from None
        return await _answer(server, request, [prompt], chat=True, client_gone=http.is_disconnected)

    app.add_middleware(_BodyLimit, limit=server.limits.max_body_bytes)
    return app


class _BodyLimit:
    """Refuses a request whose declared body is over `limit` bytes (413) or undeclared (411) before it is
    read: every client we know of sends Content-Length, and the HTTP server holds a body to it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope["headers"]).get(b"content-length")
            refusal = None
            if length is None:
                refusal = error_response("the request needs a Content-Length header", 411)
            elif not length.isdigit() or int(length) > self.limit:
                refusal = error_response(f"the request body is larger than this server allows ({self.limit} bytes)", 413)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


async def _answer(server: Server, request: _Request, prompts: list[str], chat: bool,
                  client_gone: Callable[[], Awaitable[bool]]):
    settings, prompt_tokens = await server.plan(request, prompts)
    max_tokens = settings.max_new_tokens
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": request.model}
    if request.stream:
        events = await server.run(request, prompts, settings, True, client_gone)
        return StreamingResponse(_sse(events, head, max_tokens, chat), media_type="text/event-stream")
    results = await server.run(request, prompts, settings, False, client_gone)
    choices = [_choice(index, completion, max_tokens, chat) for index, completion in enumerate(results)]
    completion_tokens = sum(completion.new_tokens for completion in results)
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _finish_reason(completion: Completion, max_tokens: int) -> str:
    return "length" if completion.new_tokens >= max_tokens else "stop"


def _choice(index: int, completion: Completion, max_tokens: int, chat: bool) -> dict:
    reason = _finish_reason(completion, max_tokens)
    if chat:
        message = {"role": "assistant", "content": completion.text, "code": extract_code(completion.text)}
        return {"index": index, "message": message, "finish_reason": reason}
    return {"index": index, "text": completion.text, "logprobs": None, "finish_reason": reason}


async def _sse(events: AsyncIterator, head: dict, max_tokens: int, chat: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shapes, then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    started: set[int] = set()
    try:
        async for index, item in events:
            finished = isinstance(item, Completion)
            if chat:
                delta = {} if finished else {"content": item}
                if index not in started:
                    delta = {"role": "assistant", **delta}
                    started.add(index)
                choice = {"index": index, "delta": delta}
            else:
                choice = {"index": index, "text": "" if finished else item, "logprobs": None}
            choice["finish_reason"] = _finish_reason(item, max_tokens) if finished else None
            yield f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"
    except Exception as error:  # noqa: BLE001  (the status line is sent: the error goes in the stream)
        body = {"error": {"message": f"generation failed: {type(error).__name__}: {error}", "type": "server_error"}}
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        await events.aclose()  # a client gone mid-stream: its rows end at the next step
    yield "data: [DONE]\n\n"


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the models load, so a port in use costs nothing."""
    try:
        return socket.create_server((host, port))
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def http_server(app: FastAPI, log_level: str = "info"):
    """uvicorn's server for the app; `.run(sockets=[sock])` serves until Ctrl-C (or `.should_exit`)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))

"""Requests that arrive together are generated together (serve.py's engine).

Jobs wait in one bounded queue. A single worker thread owns the models: it takes the oldest job and
every queued job that can share its batch (a model on the same copy of the base, whatever its adapter;
the same settings and stop strings; up to `max_batch`), generates them as one batch with the
Generator's KV-cached path, each row with its own adapter, and hands each job its answer, token by
token to a job that streams. A job whose client went away is skipped while it waits,
and its row ends at the next step once it runs. One thread, because the models share the CPU's cores:
two batches at once would only slow each other down.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from gemma.generation import Completion, GenerationSettings, Generator
from serving.models import ServedModel


class QueueFull(RuntimeError):
    """Too many jobs are waiting; the message is one line for the client."""


class WorkerStopped(RuntimeError):
    """The batch worker is not running (it died, or the server is stopping): nothing would answer."""


@dataclass(eq=False)
class Job:
    model: str
    prompt: str
    settings: GenerationSettings
    stop: tuple[str, ...]
    on_done: Callable[[Completion | BaseException], None]  # called once, from the worker thread
    on_text: Callable[[str], None] | None = None  # streaming: each new piece of the answer's text
    cancelled: bool = False  # set by the server when the client disconnects


@dataclass
class Stats:
    batches: int = 0
    jobs: int = 0
    largest_batch: int = 0
    new_tokens: int = 0
    cancelled: int = 0  # jobs whose client went away before their answer was complete


class BatchScheduler:
    def __init__(self, models: dict[str, ServedModel], max_batch: int = 16, max_queued: int = 64,
                 gather_seconds: float = 0.02):
        self.models = models
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.gather_seconds = gather_seconds  # a short wait lets requests sent together share a batch
        self.stats = Stats()
        self._queue: deque[Job] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()

    def queued(self) -> int:
        return len(self._queue)

    def worker_stopped(self) -> bool:
        """The worker was started and is gone (it died, or stop() ended it)."""
        return self._thread.ident is not None and not self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none). Raises WorkerStopped when no worker would take them, QueueFull when
        they would pass the bound."""
        with self._wakeup:
            if self.worker_stopped():
                raise WorkerStopped("the server's batch worker has stopped; it answers no more requests")
            if len(self._queue) + len(jobs) > self.max_queued:
                raise QueueFull(f"the server is busy: {len(self._queue)} requests are waiting "
                                f"(at most {self.max_queued}); retry later")
            self._queue.extend(jobs)
            self._wakeup.notify()

    def _run(self) -> None:
        """Batches until stopped. Whatever ends the worker otherwise, the jobs still waiting get an error
        rather than no answer at all."""
        try:
            while (batch := self._next_batch()) is not None:
                if batch:
                    self._generate(batch)
        finally:
            with self._wakeup:
                left, self._queue = list(self._queue), deque()
            for job in left:
                _deliver(job, WorkerStopped("the server's batch worker has stopped"))

    def _next_batch(self) -> list[Job] | None:
        """The oldest live job and the queued jobs that can join it; None once stopping."""
        with self._wakeup:
            while not self._queue and not self._stopping:
                self._wakeup.wait()
            if self._stopping:
                return None
        time.sleep(self.gather_seconds)
        with self._wakeup:
            live = [job for job in self._queue if not job.cancelled]
            self.stats.cancelled += len(self._queue) - len(live)
            if not live:
                self._queue.clear()
                return []
            key = self._batch_key(live[0])
            batch = [job for job in live if self._batch_key(job) == key][:self.max_batch]
            chosen = set(map(id, batch))
            self._queue = deque(job for job in live if id(job) not in chosen)
        return batch

    def _batch_key(self, job: Job) -> tuple:
        """Jobs with equal keys can share a batch: their models share a base, their decoding is alike."""
        return id(self.models[job.model].generator), job.settings, job.stop

    def _generate(self, batch: list[Job]) -> None:
        served = [self.models[job.model] for job in batch]
        generator, first = served[0].generator, batch[0]
        feeds = [_TextFeed(generator, job) if job.on_text else None for job in batch]
        streamer = _RowStreamer(feeds) if any(feeds) else None
        try:
            with served[0].adapters.selected([model.slot for model in served]):
                completions = generator.generate_batch([job.prompt for job in batch], first.settings, first.stop,
                                                       streamer, _Cancelled(batch))
        except Exception as error:  # noqa: BLE001  (each client gets the error; the server goes on)
            for job in batch:
                _deliver(job, error)
            return
        except BaseException as error:  # the worker is ending: its clients hear of it before it goes
            for job in batch:
                _deliver(job, WorkerStopped(f"the server's batch worker has stopped ({type(error).__name__})"))
            raise
        self.stats.batches += 1
        self.stats.jobs += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.new_tokens += sum(completion.new_tokens for completion in completions)
        self.stats.cancelled += sum(job.cancelled for job in batch)
        for job, feed, completion in zip(batch, feeds, completions):
            if feed:
                feed.finish(completion.text)
            _deliver(job, completion)


def _deliver(job: Job, result: Completion | BaseException) -> None:
    """Hand a job its result; a callback that fails is logged, and never keeps the others' from being called."""
    try:
        job.on_done(result)
    except Exception as error:  # noqa: BLE001
        print(f"batch worker: a request's callback failed: {type(error).__name__}: {error}", file=sys.stderr)


class _Cancelled(StoppingCriteria):
    """Ends the rows whose client has gone away."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([job.cancelled for job in self.jobs], device=input_ids.device)


class _RowStreamer(BaseStreamer):
    """Hands each row's new token to its feed (rows that do not stream have none)."""

    def __init__(self, feeds: list[_TextFeed | None]):
        self.feeds = feeds

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # the prompt ids, sent once before the first new token
            return
        for feed, token in zip(self.feeds, value.tolist()):
            if feed:
                feed.push(token)

    def end(self) -> None:
        """Nothing is held here: each feed gets the completion's final text when the batch returns."""


@dataclass
class _TextFeed:
    """Turns a row's tokens into text pieces for a streaming job, decoding only the newest tokens (with a
    few before them, so that a word's leading space comes out right) rather than the whole answer again at
    every token. Text that may still change is held back: a character whose bytes are still coming, and an
    ending that could be the start of a stop string."""

    generator: Generator
    job: Job
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the answer's text so far, cut at a stop string once one appears
    sent: int = 0
    prefix: int = 0  # ids[prefix:read] are the context that the newest tokens are decoded with
    read: int = 0
    ended: bool = False

    def push(self, token: int) -> None:
        if self.ended:
            return
        if token in self.generator.end_ids:
            self.ended = True  # what follows a stop token is padding
            return
        self.ids.append(token)
        decode = self.generator.tokenizer.decode
        context = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        newest = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(newest) <= len(context) or newest.endswith("\ufffd"):  # nothing new, or half a character
            return
        self.text += newest[len(context):]
        self.prefix, self.read = self.read, len(self.ids)
        self._cut_at_stop(len(newest) - len(context))
        self._send(self.text if self.ended else self.text[:len(self.text) - self._held_back(self.text)])

    def finish(self, text: str) -> None:
        self._send(text)

    def _cut_at_stop(self, added: int) -> None:
        """End the text at the first stop string, looking only where the newest characters could complete one."""
        longest = max(map(len, self.job.stop), default=0)
        window = max(0, len(self.text) - added - longest)
        found = [position for stop in self.job.stop if (position := self.text.find(stop, window)) >= 0]
        if found:
            self.text, self.ended = self.text[:min(found)], True

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            try:
                self.job.on_text(text[self.sent:])
            except Exception as error:  # noqa: BLE001  (one client's failure is not the batch's)
                print(f"batch worker: a stream's callback failed: {type(error).__name__}: {error}", file=sys.stderr)
            self.sent = len(text)

    def _held_back(self, text: str) -> int:
        return max((size for stop in self.job.stop for size in range(1, len(stop))
                    if text.endswith(stop[:size])), default=0)

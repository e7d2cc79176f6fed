"""serve.py under abuse: many concurrent clients mixing good, bad, huge and abandoned requests.

    python -m bench.serving_load --requests 1000 --clients 64            # the embedded model, base only
    python -m bench.serving_load --model DIR --requests 120 --clients 16 # any model folder

serve.py runs as its own process on 127.0.0.1 (so that its memory is its own). Request i is of kind
KINDS[i % 5]: a good chat request (greedy, --max-tokens new tokens), a good streamed one, a bad one
(unknown model, invalid JSON, max_tokens over the server's limit, in turn), a huge one (a body over the
server's --max-body-bytes, or a prompt over its --max-prompt-tokens), or one whose client goes away
50 ms after sending it. What must hold: every request that waits for its answer gets one (200 for the
good, a 4xx in OpenAI's error shape for the bad and huge), /health is 200 afterwards with nothing
queued, and the server's memory comes back to its level before the load. Prints a Markdown summary
(requests, answers by status, latency p50/p95 per kind, the server's memory) and exits 1 if any of it
does not hold.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.server_process import get_json, start_serve, stop_serve
from common.hardware import process_memory_kib
from common.options import COUNT
from gemma.loading import EMBEDDED_MODEL

KINDS = ("good", "streamed", "bad", "huge", "abandoned")
MAX_BODY_BYTES = 64 * 1024  # the server's limit in this run: a huge body is twice that
MAX_PROMPT_TOKENS = 512


@dataclass
class Answer:
    kind: str
    status: int | None  # None: the client went away on purpose
    seconds: float
    error_shape: bool = True  # a 4xx body is {"error": {"message", "type", "param", "code"}}


def request_for(index: int, max_tokens: int) -> tuple[str, bytes]:
    """(kind, body) of the index-th request."""
    kind = KINDS[index % len(KINDS)]
    turn = index // len(KINDS)
    message = [{"role": "user", "content": f"Write a function that returns {turn} squared"}]
    body: dict = {"model": "base", "messages": message, "max_tokens": max_tokens}
    if kind == "streamed":
        body["stream"] = True
    elif kind == "bad":
        variant = turn % 3
        if variant == 0:
            body["model"] = "no-such-model"
        elif variant == 1:
            return kind, b'{"model": "base", "messages": ['
        else:
            body["max_tokens"] = 10**6
    elif kind == "huge":
        size = 2 * MAX_BODY_BYTES if turn % 2 else 8 * MAX_PROMPT_TOKENS
        body["messages"] = [{"role": "user", "content": "x " * (size // 2)}]
    elif kind == "abandoned":
        body["max_tokens"] = 4 * max_tokens
        body["stream"] = bool(turn % 2)
    return kind, json.dumps(body).encode()


def send(port: int, index: int, max_tokens: int) -> Answer:
    kind, body = request_for(index, max_tokens)
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        if kind == "abandoned":
            time.sleep(0.05)
            connection.sock.shutdown(socket.SHUT_RDWR)
            return Answer(kind, None, time.perf_counter() - started)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    seconds = time.perf_counter() - started
    shape = True
    if response.status >= 400:
        try:
            shape = set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}
        except (ValueError, KeyError, TypeError):
            shape = False
    return Answer(kind, response.status, seconds, shape)


def start_server(model: str, max_batch: int, scratch: Path) -> tuple[subprocess.Popen, int]:
    """serve.py with the base model alone (an empty --outputs), its log in `scratch`; (process, port)."""
    return start_serve(["--model", model, "--outputs", str(scratch), "--max-batch", str(max_batch),
                        "--max-queue", "256", "--max-body-bytes", str(MAX_BODY_BYTES),
                        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-tokens-limit", "256"],
                       scratch / "serve.log")


def run(model: str, requests: int, clients: int, max_tokens: int, max_batch: int) -> tuple[str, bool]:
    """The load, against a fresh server; (the Markdown summary, whether everything held)."""
    with tempfile.TemporaryDirectory(prefix="serving-load-") as scratch:
        return _load(*start_server(model, max_batch, Path(scratch)), requests, clients, max_tokens)


def _load(server: subprocess.Popen, port: int, requests: int, clients: int, max_tokens: int) -> tuple[str, bool]:
    try:
        for index in range(2 * len(KINDS)):  # one of each kind first: the memory before is after a warm-up
            send(port, index, max_tokens)
        time.sleep(1.0)
        before = process_memory_kib(server.pid, "VmRSS")
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda index: send(port, index, max_tokens), range(requests)))
        seconds = time.perf_counter() - started
        deadline = time.monotonic() + 120
        while (status := get_json(port, "/health"))[1]["queued"] and time.monotonic() < deadline:
            time.sleep(0.5)  # abandoned requests still queued are skipped as the worker reaches them
        time.sleep(1.0)
        after, peak = process_memory_kib(server.pid, "VmRSS"), process_memory_kib(server.pid, "VmHWM")
        return summarize(answers, seconds, status, before, after, peak, requests, clients)
    finally:
        stop_serve(server)


def summarize(answers: list[Answer], seconds: float, final_health: tuple[int, dict], before: int, after: int,
              peak: int, requests: int, clients: int) -> tuple[str, bool]:
    expected = {"good": {200}, "streamed": {200}, "bad": {400, 404}, "huge": {400, 413}, "abandoned": {None}}
    wrong = [answer for answer in answers if answer.status not in expected[answer.kind] or not answer.error_shape]
    code, body = final_health
    # "Back to its level": within 10% (or 50 MiB) of the level before; the allocator keeps some pages.
    memory_back = after <= before + max(0.1 * before, 50 * 1024)
    held = not wrong and code == 200 and body["status"] == "ok" and memory_back
    lines = [f"{requests} requests from {clients} concurrent clients in {seconds:.1f} s; "
             f"answers by status: {dict(sorted(Counter(str(a.status) for a in answers).items()))}; "
             f"unexpected: {len(wrong)}", "",
             "| kind | requests | status | p50 latency | p95 latency |", "|---|---|---|---|---|"]
    for kind in KINDS:
        mine = sorted(answer.seconds for answer in answers if answer.kind == kind)
        if not mine:
            continue
        statuses = ", ".join(f"{status}: {count}" for status, count in
                             sorted(Counter(str(a.status) for a in answers if a.kind == kind).items()))
        p95 = mine[min(len(mine) - 1, round(0.95 * (len(mine) - 1)))]
        lines.append(f"| {kind} | {len(mine)} | {statuses} | {statistics.median(mine):.2f} s | {p95:.2f} s |")
    lines += ["", f"after: /health {code} {body['status']!r}, {body['queued']} queued, {body['requests']} generated, "
                  f"{body['cancelled']} cancelled; server memory (RSS) {before / 1024:.0f} MiB before, peak "
                  f"{peak / 1024:.0f} MiB, {after / 1024:.0f} MiB after; "
                  f"{'everything held' if held else 'NOT everything held'}"]
    return "\n".join(lines) + "\n", held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model id or folder (default: %(default)s)")
    parser.add_argument("--requests", type=COUNT, default=1000, help="(default: %(default)s)")
    parser.add_argument("--clients", type=COUNT, default=64, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--max-tokens", type=COUNT, default=8, help="new tokens of a good answer (default: %(default)s)")
    parser.add_argument("--max-batch", type=COUNT, default=16, help="serve.py's --max-batch (default: %(default)s)")
    args = parser.parse_args(argv)
    summary, held = run(args.model, args.requests, args.clients, args.max_tokens, args.max_batch)
    print(summary, end="")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())

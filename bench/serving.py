"""serve.py under load: requests/s and latency for 1, 4 and 16 concurrent clients, with dynamic
batching and with one request at a time (the same server with --max-batch 1).

    python -m bench.serving --adapter outputs/lora_r16 --clients 1,4,16 --requests-per-client 2

Each client sends its chat requests one after another (held-out instructions, greedy, --max-tokens new
tokens at most) to a server started in this process on 127.0.0.1. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.generation import held_out_instructions
from common.options import COUNT, COUNTS, DEVICE
from gemma.loading import ModelLoadError, add_model_option
from lora import AdapterError
from serving import app
from serving.batcher import BatchScheduler
from serving.models import BASE, ServedModel, load_models


def run_clients(port: int, model: str, instructions: list[str], clients: int, per_client: int,
                max_tokens: int) -> dict:
    """Every client's requests, timed; requests/s over the whole run and latency percentiles."""
    def client(index: int) -> list[float]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        latencies = []
        for number in range(per_client):
            instruction = instructions[(index * per_client + number) % len(instructions)]
            body = json.dumps({"model": model, "max_tokens": max_tokens,
                               "messages": [{"role": "user", "content": instruction}]})
            started = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            latencies.append(time.perf_counter() - started)
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(latency for result in pool.map(client, range(clients)) for latency in result)
    seconds = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "seconds": round(seconds, 1),
            "requests_per_s": round(len(latencies) / seconds, 3),
            "p50_s": round(statistics.median(latencies), 2),
            "p95_s": round(latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], 2)}


def measure(models: dict[str, ServedModel], model: str, instructions: list[str], client_counts: list[int],
            per_client: int, max_tokens: int, max_batch: int) -> list[dict]:
    scheduler = BatchScheduler(models, max_batch=max_batch, max_queued=1024)
    scheduler.start()
    sock = app.listen("127.0.0.1", 0)
    server = app.http_server(app.create_app(app.Server(scheduler)), log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        results = []
        for clients in client_counts:
            before = scheduler.stats.batches
            result = run_clients(sock.getsockname()[1], model, instructions, clients, per_client, max_tokens)
            result.update(max_batch=max_batch, batches=scheduler.stats.batches - before)
            print(json.dumps(result), flush=True)
            results.append(result)
        return results
    finally:
        server.should_exit = True
        thread.join()
        scheduler.stop()


def markdown(results: list[dict]) -> str:
    lines = ["| clients | batching | requests | batches | requests/s | p50 latency | p95 latency |",
             "|---|---|---|---|---|---|---|"]
    for result in sorted(results, key=lambda result: (result["clients"], -result["max_batch"])):
        batching = "dynamic" if result["max_batch"] > 1 else "one at a time"
        lines.append(f"| {result['clients']} | {batching} | {result['requests']} | {result['batches']} | "
                     f"{result['requests_per_s']:.2f} | {result['p50_s']:.1f} s | {result['p95_s']:.1f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(parser)
    parser.add_argument("--adapter", help="serve this adapter (default: the base model)")
    parser.add_argument("--dataset", default="default", help="where the held-out instructions come from")
    parser.add_argument("--clients", type=COUNTS, default="1,4,16",
                        help="concurrent clients, comma-separated (default: 1,4,16)")
    parser.add_argument("--requests-per-client", type=COUNT, default=2, help="(default: %(default)s)")
    parser.add_argument("--max-tokens", type=COUNT, default=64, help="per answer (default: %(default)s)")
    parser.add_argument("--max-batch", type=COUNT, default=16, help="the batched server's limit (default: %(default)s)")
    parser.add_argument("--device", type=DEVICE)
    parser.add_argument("--result", help="JSON file for the measurements")
    args = parser.parse_args(argv)
    name = Path(args.adapter).name if args.adapter else BASE
    try:
        models = load_models(args.model, {name: Path(args.adapter)} if args.adapter else {}, args.device)
    except (ModelLoadError, AdapterError) as error:
        parser.error(str(error))
    instructions = [f"{instruction}\n{input}" if input else instruction
                    for instruction, input in held_out_instructions(args.dataset, 64)]
    results = []
    for max_batch in (args.max_batch, 1):
        results += measure(models, name, instructions, args.clients, args.requests_per_client, args.max_tokens,
                           max_batch)
    print(markdown(results), end="")
    if args.result:
        Path(args.result).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

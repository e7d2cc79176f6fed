"""Many adapters on one base against one base copy per adapter (`make bench-serve-adapters`).

    python -m bench.serving_adapters --adapter outputs/lora_r16 --baseline REV
    python -m bench.serving_adapters --adapter A --adapter B --adapter C --clients 16 --requests-per-client 4

Serves the base model and three adapters to 16 concurrent clients, client i asking model i % 4 (so the
requests are spread evenly over the four models), each client's held-out instructions one after
another (greedy, --max-tokens new tokens at most). Three servers run one after another, each as its own
process on 127.0.0.1:
- this tree's serve.py with the base model alone: its resident memory is the reference;
- this tree's serve.py with the adapters: one copy of the base, batches that mix the models;
- serve.py as it was at git revision --baseline: one copy of the base per model, batches of one model.
Reports requests/s, latency p50/p95, the server's resident memory after one warm-up request per model
and at its peak, and how many answers the two servers give alike. Given fewer than three adapters, the
rest are derived from the first by scaling its B matrices (x0.5, x0.75): other weights of the same
shapes, which is all that speed and memory depend on. Timings mean something only on an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.generation import held_out_instructions
from bench.measure import machine_description
from bench.server_process import ROOT, get_json, start_serve, stop_serve
from common.hardware import process_memory_kib
from common.options import COUNT
from gemma.loading import EMBEDDED_MODEL
from lora import read_adapter_config, save_adapter_tensors
from lora.adapter import read_adapter_weights

DERIVED_SCALES = (0.5, 0.75)


@dataclass
class Run:
    server: str
    answers: list[str]  # by request, in the order the requests were made
    seconds: float
    latencies: list[float]
    resident_mib: float  # after the warm-up
    peak_mib: float
    reported: dict | None  # what /health says the models hold (None: a server that does not say)

    def row(self, base_alone_mib: float) -> str:
        ordered = sorted(self.latencies)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        return (f"| {self.server} | {len(self.answers)} in {self.seconds:.0f} s | {len(self.answers) / self.seconds:.2f} | "
                f"{statistics.median(ordered):.1f} s / {p95:.1f} s | {self.resident_mib:,.0f} MiB "
                f"({self.resident_mib / base_alone_mib:.2f}x) | {self.peak_mib:,.0f} MiB |")


def derive_adapters(first: Path, count: int, scratch: Path) -> list[Path]:
    """`count` adapters: `first`, then copies of it with B scaled (train_config.json kept: NF4 or not)."""
    derived = [first]
    config, tensors = read_adapter_config(first), read_adapter_weights(first)
    for scale in DERIVED_SCALES[:count - 1]:
        folder = scratch / f"{first.name}_x{scale}"
        save_adapter_tensors({key: value * scale if ".lora_B." in key else value for key, value in tensors.items()},
                             folder, config)
        if (first / "train_config.json").exists():
            shutil.copy(first / "train_config.json", folder)
        derived.append(folder)
    return derived


def chat(port: int, model: str, instruction: str, max_tokens: int) -> tuple[str, float]:
    body = json.dumps({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": instruction}]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    started = time.perf_counter()
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read())
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload}")
    return payload["choices"][0]["message"]["content"], time.perf_counter() - started


def load(server: str, process: subprocess.Popen, port: int, models: list[str], instructions: list[str], clients: int,
         per_client: int, max_tokens: int) -> Run:
    """Warm up (one request per model), then every client's requests; the server's memory before and at peak."""
    for model in models:
        chat(port, model, instructions[0], 4)
    resident = process_memory_kib(process.pid, "VmRSS")

    def client(index: int) -> list[tuple[str, float]]:
        model = models[index % len(models)]
        return [chat(port, model, instructions[(index * per_client + number) % len(instructions)], max_tokens)
                for number in range(per_client)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [answer for answers in pool.map(client, range(clients)) for answer in answers]
    seconds = time.perf_counter() - started
    peak = process_memory_kib(process.pid, "VmHWM")
    return Run(server, [text for text, _ in results], seconds, [latency for _, latency in results],
               resident / 1024, peak / 1024, get_json(port, "/health")[1].get("memory"))


def serve_and_load(server: str, arguments: list[str], log: Path, tree: Path, **load_options) -> Run:
    process, port = start_serve(arguments, log, tree)
    try:
        return load(server, process, port, **load_options)
    finally:
        stop_serve(process)


def base_alone_mib(model: str, scratch: Path) -> float:
    process, port = start_serve(["--model", model, "--outputs", str(scratch / "none")], scratch / "alone.log")
    try:
        chat(port, "base", "Write a function that returns 1", 4)
        return process_memory_kib(process.pid, "VmRSS") / 1024
    finally:
        stop_serve(process)


def derived_note(given: int) -> str:
    scales = DERIVED_SCALES[:3 - given]
    return f" and {len(scales)} derived from the first (its B x{', x'.join(map(str, scales))})" if scales else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="base model (default: %(default)s)")
    parser.add_argument("--adapter", action="append", default=None, help="an adapter folder (up to 3; default: "
                        "outputs/lora_r16 and two derived from it)")
    parser.add_argument("--baseline", required=True, help="git revision of the one-copy-per-adapter server")
    parser.add_argument("--clients", type=COUNT, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests-per-client", type=COUNT, default=4, help="(default: %(default)s)")
    parser.add_argument("--max-tokens", type=COUNT, default=64, help="per answer (default: %(default)s)")
    parser.add_argument("--max-batch", type=COUNT, default=16, help="both servers' --max-batch (default: %(default)s)")
    parser.add_argument("--report", default="results/serving_adapters/README.md", help="Markdown report to write")
    args = parser.parse_args(argv)
    given = [Path(folder) for folder in (args.adapter or ["outputs/lora_r16"])][:3]

    with tempfile.TemporaryDirectory(prefix="serving-adapters-") as name:
        scratch = Path(name)
        # Absolute: the baseline server runs in a checkout of its own.
        adapters = [folder.resolve() for folder in given] + derive_adapters(given[0], 4 - len(given), scratch)[1:]
        names = [f"adapter{index}" for index in range(1, len(adapters) + 1)]
        served = ["--model", args.model, "--max-batch", str(args.max_batch), "--max-queue", "256",
                  *[option for label, folder in zip(names, adapters) for option in ("--adapter", f"{label}={folder}")]]
        instructions = [f"{text}\n{extra}" if extra else text for text, extra in held_out_instructions("default", 64)]
        options = dict(models=["base", *names], instructions=instructions, clients=args.clients,
                       per_client=args.requests_per_client, max_tokens=args.max_tokens)
        alone = base_alone_mib(args.model, scratch)
        shared = serve_and_load("one base, mixed batches", served, scratch / "shared.log", ROOT, **options)
        print(shared.row(alone), flush=True)
        tree = scratch / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline],
                       check=True, capture_output=True)
        try:
            copies = serve_and_load(f"one base per model (`{args.baseline}`)", served, scratch / "baseline.log", tree,
                                    **options)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)

    same = sum(a == b for a, b in zip(shared.answers, copies.answers))
    report = "\n".join([
        "# Many adapters on one base model",
        "",
        f"Command: `python -m bench.serving_adapters {shlex.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Adapters: {', '.join(f'`{folder}`' for folder in given)}{derived_note(len(given))}; model `{args.model}`; {args.clients} clients x {args.requests_per_client} requests, client i asking model i % 4; "
        f"up to {args.max_tokens} new tokens; --max-batch {args.max_batch}  ",
        f"Machine: {machine_description(torch.device('cpu'))}  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        f"The base model alone: {alone:,.0f} MiB resident after one request.",
        "",
        "| server | requests | requests/s | latency p50 / p95 | memory after warm-up (x base alone) | peak memory |",
        "|---|---|---|---|---|---|",
        shared.row(alone),
        copies.row(alone),
        "",
        f"The same answer from both servers: {same} of {len(shared.answers)} requests. The shared server's "
        f"/health: {json.dumps(shared.reported)}.",
        "",
    ])
    path = Path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

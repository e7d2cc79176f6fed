"""Serve the base model and its adapters over HTTP, in OpenAI's API shapes.

    python serve.py                                      # base + every adapter under outputs/
    python serve.py --adapter lora=outputs/lora_r16 --port 8000

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "lora", "messages": [{"role": "user", "content": "Write a function to reverse a string"}]}'

Endpoints: POST /v1/chat/completions and POST /v1/completions (model = "base" or an adapter's name;
max_tokens, temperature, top_p, stop, seed, stream with server-sent events), GET /v1/models, GET /health.
Decoding is greedy unless temperature > 0, and max_tokens defaults to 512, as in generate.py (not
OpenAI's defaults). A chat answer's message also carries `code`, the Python extracted from it.

Every adapter shares one copy of the base model (QLoRA adapters a second one, on the NF4 base they were
trained on), so n adapters cost one base plus n small adapters (serving/models.py; /health reports it).
Requests that arrive together are generated together, whatever adapters they ask for, each row with its
own adapter and turn-marker rows (serving/batcher.py, lora/multi.py). Each request is bounded
(--max-tokens-limit, --max-prompt-tokens, --max-body-bytes: errors in OpenAI's shape); a client that goes
away frees its row; /health answers 503 if the batch worker has stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from common.files import OUTPUTS
from common.options import COUNT, DEVICE, ranged
from gemma.loading import ModelLoadError, add_model_option
from lora import AdapterError, read_adapter_config
from lora.adapter import adapter_folders
from serving.app import Server, ServerLimits, create_app, http_server, listen
from serving.batcher import BatchScheduler
from serving.models import BASE, load_models


def parse_adapters(specs: Sequence[str] | None, outputs: Path) -> dict[str, Path]:
    """NAME=DIR pairs (a bare DIR is named after its folder); none given: every adapter under outputs/."""
    if specs is None:
        return {folder.name: folder for folder in adapter_folders(outputs)}
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        if not name or name == BASE or name in adapters:
            raise AdapterError(f"--adapter {spec!r}: each adapter needs its own name, other than {BASE!r}")
        adapters[name] = Path(folder)
    return adapters


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        adapters = parse_adapters(args.adapter, Path(args.outputs))
        for folder in adapters.values():
            read_adapter_config(folder)  # a bad adapter fails before the port is taken and any model loads
        sock = listen(args.host, args.port)
        scheduler = BatchScheduler(load_models(args.model, adapters, args.device), args.max_batch, args.max_queue)
    except (ModelLoadError, AdapterError, OSError) as error:
        print(f"serve.py: error: {error}", file=sys.stderr)
        return 2
    scheduler.start()
    host, port = sock.getsockname()[:2]
    print(f"serving {', '.join(scheduler.models)} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on Ctrl-C or `kill`, then raises the signal again for its caller:
    # as KeyboardInterrupt for both, so that a deliberate stop ends with exit code 0, not a traceback.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            limits = ServerLimits(args.max_tokens_limit, args.max_prompt_tokens, args.max_body_bytes)
            http_server(create_app(Server(scheduler, limits))).run(sockets=[sock])
    finally:
        scheduler.stop()
    print("stopped", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(parser)
    parser.add_argument("--adapter", action="append", metavar="NAME=DIR",
                        help="serve this adapter as model NAME (repeatable; default: every adapter under --outputs, "
                             "named after its folder)")
    parser.add_argument("--outputs", default=str(OUTPUTS), help="where adapters are found by default (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=ranged(int, 0, 65535), default=8000,
                        help="port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--max-batch", type=COUNT, default=16, help="requests generated together (default: %(default)s)")
    parser.add_argument("--max-queue", type=COUNT, default=64,
                        help="requests that may wait; more get HTTP 429 (default: %(default)s)")
    limits = ServerLimits()
    parser.add_argument("--max-tokens-limit", type=COUNT, default=limits.max_tokens,
                        help="the largest max_tokens a request may ask for; more get HTTP 400 (default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=COUNT, default=limits.max_prompt_tokens,
                        help="the longest prompt, in tokens; longer get HTTP 400 (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=COUNT, default=limits.max_body_bytes,
                        help="the largest request body; larger get HTTP 413 (default: %(default)s)")
    parser.add_argument("--device", type=DEVICE, help="cpu, cuda or cuda:N (default: cuda when available)")
    return parser


if __name__ == "__main__":
    sys.exit(main())

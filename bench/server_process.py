"""serve.py as its own process on 127.0.0.1 (so that its memory is its own), for the serving benchmarks."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_serve(arguments: list[str], log: Path, tree: Path = ROOT) -> tuple[subprocess.Popen, int]:
    """`python serve.py --port 0 ARGUMENTS` in the source tree `tree`, its output in `log`; (process, port)
    once it listens. Raises RuntimeError with the log's end if it exits first."""
    command = [sys.executable, "serve.py", "--port", "0", *arguments]
    with log.open("w") as handle:
        server = subprocess.Popen(command, cwd=tree, stdout=handle, stderr=handle)
    while server.poll() is None:
        if match := re.search(r"on http://[\d.]+:(\d+)/v1", log.read_text()):
            return server, int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"serve.py exited with {server.returncode} before it listened: {log.read_text()[-2000:]}")


def stop_serve(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=60)


def get_json(port: int, path: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()

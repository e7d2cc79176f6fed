"""Running untrusted Python programs, one process each, and telling why each one failed.

Every program runs in a fresh interpreter (see `_child.py` for what it sets up), in a new POSIX
process session (`start_new_session`) and a throw-away directory. When the evaluator runs as root,
every concurrently running program also gets its own unprivileged user id, borrowed from a pool: the
kernel then counts processes per program, and after the program ends everything still running under
that id is killed, including processes that started a process session of their own. The program's
result is written to a file the evaluator reads only after the whole process tree is gone, so no
program can hang the evaluator. A result counts only when it carries the one-time secret the runner
gave that program and the process exited normally: generated code cannot mark itself correct by
writing a passing line of its own and leaving before its tests run.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

CHILD_SCRIPT = Path(__file__).with_name("_child.py")
# Sandbox user ids: unused numbers well below `nobody` (65534), which stay inside the uid range a
# container maps. Never `nobody` itself: after each program every process of its uid is killed.
FIRST_SANDBOX_UID = 61000
SANDBOX_UID_SLOTS = 32
STDERR_TAIL_CHARS = 2000
REAP_TIMEOUT_S = 5.0
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Limits:
    """What one program may use. `guard` switches the Python-level audit hook (tests turn it off
    to show that the operating-system limits alone contain a hostile program)."""

    timeout_s: float = 10.0
    memory_bytes: int = 512 * 2**20
    max_processes: int = 8
    max_file_bytes: int = 16 * 2**20
    guard: bool = True


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", or one line saying why not
    stderr_tail: str = ""


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` in the sandbox; it passes when it runs to its end without raising."""
    with _borrowed_uid() as uid, tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as root:
        sample_dir = Path(root)
        sample_dir.chmod(0o711)  # the sandbox user may enter, not list
        workdir = _make_workdir(sample_dir, uid)
        secret = secrets.token_hex(16)
        with open(sample_dir / "stdout", "wb") as stdout, open(sample_dir / "stderr", "wb") as stderr, \
                open(sample_dir / "result", "w+b") as result:
            timed_out, returncode = _run_child(f"{secret}\n{source}", limits, uid, workdir, stdout, stderr, result)
            result.seek(0)
            reported = result.read().decode(errors="replace")
        stderr_tail = (sample_dir / "stderr").read_bytes()[-STDERR_TAIL_CHARS:].decode(errors="replace")
    return _outcome(_verdict(reported, secret), reported, timed_out, returncode, limits, stderr_tail)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 description: str = "running programs") -> list[Outcome]:
    """Run many programs with a small pool of workers (each waits on one sandboxed process)."""
    workers = workers or os.cpu_count() or 1
    outcomes: list[Outcome | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=min(workers, SANDBOX_UID_SLOTS)) as pool, \
            tqdm(total=len(sources), desc=description, unit="program", leave=False) as progress:
        def run_one(index: int) -> None:
            outcomes[index] = run_program(sources[index], limits)
            progress.update()

        for future in [pool.submit(run_one, index) for index in range(len(sources))]:
            future.result()
    return outcomes  # type: ignore[return-value]


def _make_workdir(sample_dir: Path, uid: int | None) -> Path:
    workdir = sample_dir / "work"
    workdir.mkdir(mode=0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
    return workdir


def _run_child(stdin: str, limits: Limits, uid: int | None, workdir: Path, stdout, stderr,
               result) -> tuple[bool, int]:
    """Start the child, wait up to the time limit, then kill whatever is left of it."""
    settings = {
        "uid": uid,
        "guard": limits.guard,
        "result_fd": result.fileno(),
        "memory_bytes": limits.memory_bytes,
        "max_processes": limits.max_processes,
        "max_file_bytes": limits.max_file_bytes,
        "cpu_seconds": int(limits.timeout_s) + 1,  # a backstop; the wall-time limit comes first
    }
    process = subprocess.Popen(
        [sys.executable, "-I", "-B", str(CHILD_SCRIPT), json.dumps(settings)],
        stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=workdir, env=_CHILD_ENVIRONMENT,
        start_new_session=True, pass_fds=(result.fileno(),),
    )
    timed_out = False
    try:
        process.communicate(stdin.encode(), timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_session(process.pid)
        process.wait()
        if uid is not None:
            _kill_and_reap_user(uid)
    return timed_out, process.returncode


# Enough for the interpreter; nothing from the evaluator's environment leaks in.
_CHILD_ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _kill_session(session_id: int) -> None:
    try:
        os.killpg(session_id, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_and_reap_user(uid: int) -> None:
    """Kill what is left under `uid`, including processes that left the session, and reap them.

    Killed orphans come back to us as zombies (we are their subreaper) and are reaped here:
    the machine's init may never reap them, and zombies would still count against the process
    limit of the next program that borrows this uid.
    """
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while (left := _processes_of(uid)) and time.monotonic() < deadline:
        _signal_every_process_of(uid)
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # its parent has not died yet, so it is not ours yet
                pass
        time.sleep(0.01)


def _signal_every_process_of(uid: int) -> None:
    """SIGKILL every process of `uid`: a helper becomes `uid` and signals -1, which reaches
    every process it may signal, that is, only those of `uid`."""
    helper = os.fork()
    if helper == 0:
        try:
            os.setuid(uid)
            for _ in range(10):  # a fork bomb may fork while it is being killed
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _processes_of(uid: int) -> list[int]:
    return [pid for pid, uids in _running_processes() if uid in uids]


def _verdict(reported: str, secret: str) -> dict | None:
    """The line of the result file that carries `secret` (the sandbox's own), or None."""
    for line in reported.splitlines():
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and result.get("secret") == secret:
            return result
    return None


def _outcome(verdict: dict | None, reported: str, timed_out: bool, returncode: int, limits: Limits,
             stderr_tail: str) -> Outcome:
    if verdict is not None and returncode == 0:
        return Outcome(verdict.get("passed") is True, str(verdict.get("reason")), stderr_tail)
    if reported.strip() and verdict is None:
        return Outcome(False, "the program wrote a result of its own (not the sandbox's)", stderr_tail)
    if timed_out:
        return Outcome(False, f"timed out after {limits.timeout_s:g} s", stderr_tail)
    if returncode < 0:
        return Outcome(False, _describe_signal(-returncode), stderr_tail)
    return Outcome(False, f"the process ended (exit code {returncode}) before the program finished", stderr_tail)


def _describe_signal(number: int) -> str:
    name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
    why = {"SIGXCPU": "CPU time limit exceeded", "SIGXFSZ": "file size limit exceeded",
           "SIGKILL": "killed, probably for memory"}.get(name, "crashed")
    return f"{why} ({name})"


@contextmanager
def _borrowed_uid() -> Iterator[int | None]:
    """A sandbox uid for the duration of one program; None when not root (no uid to switch to)."""
    if os.geteuid() != 0:
        yield None
        return
    free = _free_uids()
    uid = free.get()
    try:
        yield uid
    finally:
        free.put(uid)


_uid_pool: queue.Queue[int] | None = None
_uid_pool_lock = threading.Lock()


def _free_uids() -> queue.Queue[int]:
    global _uid_pool
    with _uid_pool_lock:
        if _uid_pool is None:
            _become_subreaper()
            _uid_pool = queue.Queue()
            for uid in _unused_uids(SANDBOX_UID_SLOTS):
                _uid_pool.put(uid)
        return _uid_pool


def _become_subreaper() -> None:
    """Orphaned descendants of our children get reparented to us instead of to init, so that
    `_kill_and_reap_user` can reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _unused_uids(count: int) -> list[int]:
    """uids with no account and no running process, starting at FIRST_SANDBOX_UID."""
    busy = _uids_of_running_processes()
    unused = []
    for uid in range(FIRST_SANDBOX_UID, 65534):
        if uid not in busy and not _has_account(uid):
            unused.append(uid)
            if len(unused) == count:
                break
    return unused


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _uids_of_running_processes() -> set[int]:
    return {uid for _, uids in _running_processes() for uid in uids}


def _running_processes() -> list[tuple[int, set[int]]]:
    """(pid, {real, effective, saved, filesystem uid}) of every process, zombies included."""
    processes = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid_line = next(line for line in status.read_text().splitlines() if line.startswith("Uid:"))
        except (OSError, StopIteration):  # the process ended while we looked
            continue
        processes.append((int(status.parent.name), {int(value) for value in uid_line.split()[1:]}))
    return processes

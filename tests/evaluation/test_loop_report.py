"""evaluation/loop_report.py: the kinds of answers that run to the token limit, and where their loops start."""

from __future__ import annotations

import json

import pytest

from evaluation import loop_report
from evaluation.loop_report import count_loops, kind_of_loop

COUNTING = "def f(n):\n    x = n\n" + "".join(f"    if n == {i}:\n        return {i}\n" for i in range(30))
COPIES = "\n\n\n".join(["def g(x):\n    return x + 1"] * 6)
ONE_LONG_LINE = "def h():\n    return [" + ", ".join(["0"] * 120)
CUT = "def k(values):\n    total = 0\n    for value in values:\n        total += value * value - 3"


@pytest.mark.parametrize("text, kind, start", [
    (COUNTING, "inside the body", 2),  # numbers ignored: `if n == 0:` ... `if n == 29:` are one line
    ("```python\n" + COUNTING, "inside the body", 2),  # an unclosed fence is not part of the code
    (COPIES, "after a definition", None),
    (ONE_LONG_LINE, "within a line", None),
    (CUT, "other", None),
])
def test_kinds_of_answers_at_the_limit(text, kind, start):
    assert kind_of_loop(text) == (kind, start)


def test_a_function_whose_body_has_blank_lines_is_not_a_finished_definition():
    body_with_blanks = "def f(m):\n" + "".join(f"    if m.get({i}) == 0:\n        return\n\n" for i in range(20))
    assert kind_of_loop(body_with_blanks) == ("inside the body", 1)


def test_only_answers_at_the_limit_are_sorted():
    records = [{"text": COUNTING, "new_tokens": 512}, {"text": COPIES, "new_tokens": 512},
               {"text": "def ok():\n    return 1", "new_tokens": 9}, {"text": COUNTING, "new_tokens": 511}]
    counts = count_loops(records, max_new_tokens=512)
    assert (counts.answers, counts.at_limit) == (4, 2)
    assert counts.kinds == {"inside the body": 1, "after a definition": 1}
    assert counts.loop_start_lines == [2]
    assert counts.ended_lines == [2, COUNTING.count("\n")]


def test_command_line_table_and_a_bad_file(tmp_path, capsys):
    cache = tmp_path / "lora_r16-0123.jsonl"
    cache.write_text("".join(json.dumps({"key": str(i), "text": COUNTING, "new_tokens": 512}) + "\n" for i in range(3)))
    assert loop_report.main([str(cache)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == f"| {cache} | 3 | 3 | 0 | 3 | 0 | 0 | 3 [3, 3] | - |"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "text": "x"}\n')
    assert loop_report.main([str(bad)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "needs 'text' and 'new_tokens'" in error

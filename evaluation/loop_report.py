"""What the answers that never end are doing: a look at evaluate.py's generation cache.

    python -m evaluation.loop_report outputs/eval_cache/*.jsonl
    python -m evaluation.loop_report --max-new-tokens 512 outputs/eval_cache/lora_r16-5f44f48ee0bda38c.jsonl

An answer that reaches the token limit did not end its turn (evaluate.py's "ended turn %"). This sorts
every such answer in each cache file (all its prompts: held-out rows, HumanEval chat and raw) into:

  after a definition   the answer up to a blank line parses and defines a function or class, and what
                       follows starts a new top-level statement (more definitions, usually copies): the
                       model missed its moment to end;
  inside the body      a line repeats, numbers ignored (`if n == 26: return 26`, `if n == 27: ...` are one
                       line), at least REPEATS more times: a greedy loop over lines;
  within a line        one line grows past LONG_LINE characters (`[0, 0, 0, ...`, `f(f(f(...`);
  other                none of these (a long answer that was cut, or a loop of another shape).

and says at which line of the answer the repetition starts, beside the length in lines of the answers
that ended: a loop that starts early is not a matter of answers longer than the training rows.
"""

from __future__ import annotations

import argparse
import ast
import re
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.files import FileError, read_jsonl
from common.options import COUNT
from gemma.chat_format import extract_code
from gemma.generation import GenerationSettings

REPEATS = 4  # a line pattern met this many more times further on is a loop
MIN_PATTERN = 8  # shorter lines ("else:", "pass", ")") repeat in any code
LONG_LINE = 200  # characters; longer than any line a person or a formatter writes


@dataclass
class LoopCounts:
    answers: int = 0
    at_limit: int = 0
    kinds: Counter = field(default_factory=Counter)  # answers at the limit by kind (the docstring's)
    loop_start_lines: list[int] = field(default_factory=list)  # where each loop inside the body starts, 0-based
    ended_lines: list[int] = field(default_factory=list)  # the length in lines of each answer that ended


def line_pattern(line: str) -> str:
    return re.sub(r"\d+", "N", line.strip())


def loop_start(lines: Sequence[str]) -> int | None:
    """The first line whose pattern comes back at least REPEATS more times, or None."""
    patterns = [line_pattern(line) for line in lines]
    for index, pattern in enumerate(patterns):
        if len(pattern) >= MIN_PATTERN and patterns[index + 1:].count(pattern) >= REPEATS:
            return index
    return None


def ends_a_definition(code: str) -> bool:
    """Whether the code up to some blank line parses and defines a function or class, and a new
    top-level statement follows."""
    for cut in (match.start() for match in re.finditer(r"\n\s*\n(?=\S)", code)):
        try:
            tree = ast.parse(code[:cut])
        except SyntaxError:
            continue
        if any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body):
            return True
    return False


def kind_of_loop(text: str) -> tuple[str, int | None]:
    """(kind, the line where a loop inside the body starts) for an answer that hit the limit, judged
    on its code as evaluate.py extracts it."""
    code = extract_code(text)
    if ends_a_definition(code):
        return "after a definition", None
    lines = code.splitlines()
    start = loop_start(lines)
    if start is not None:
        return "inside the body", start
    return ("within a line" if max(map(len, lines), default=0) > LONG_LINE else "other"), None


def count_loops(records: Sequence[dict], max_new_tokens: int) -> LoopCounts:
    counts = LoopCounts(answers=len(records))
    for record in records:
        if record["new_tokens"] < max_new_tokens:
            counts.ended_lines.append(len(extract_code(record["text"]).splitlines()))
            continue
        counts.at_limit += 1
        kind, start = kind_of_loop(record["text"])
        counts.kinds[kind] += 1
        if start is not None:
            counts.loop_start_lines.append(start)
    return counts


def markdown(rows: dict[str, LoopCounts]) -> str:
    lines = ["| cache file | answers | at the limit | after a definition | inside the body | within a line | other | "
             "loop inside the body starts at line: median [quartiles] | answers that ended: lines, median |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, counts in rows.items():
        lines.append(f"| {name} | {counts.answers} | {counts.at_limit} | {counts.kinds['after a definition']} | "
                     f"{counts.kinds['inside the body']} | {counts.kinds['within a line']} | {counts.kinds['other']} | "
                     f"{_median_and_quartiles(counts.loop_start_lines)} | "
                     f"{_median(counts.ended_lines)} |")
    return "\n".join(lines) + "\n"


def _median(values: list[int]) -> str:
    return f"{statistics.median(values):g}" if values else "-"


def _median_and_quartiles(starts: list[int]) -> str:
    """Of 0-based line indices, as 1-based line numbers."""
    numbers = [start + 1 for start in starts]
    if len(numbers) < 2:  # statistics.quantiles needs two
        return str(numbers[0]) if numbers else "-"
    low, middle, high = statistics.quantiles(numbers, n=4)
    return f"{middle:g} [{low:g}, {high:g}]"


def _records(path: Path) -> list[dict]:
    records = []
    for where, record in read_jsonl(path, "cached generation"):
        if not (isinstance(record, dict) and isinstance(record.get("text"), str)
                and isinstance(record.get("new_tokens"), int)):
            raise FileError(f"{where}: not a cached generation (needs 'text' and 'new_tokens')")
        records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caches", nargs="+", type=Path, help="evaluate.py cache files (outputs/eval_cache/*.jsonl)")
    parser.add_argument("--max-new-tokens", type=COUNT, default=GenerationSettings.max_new_tokens,
                        help="the limit the answers were generated with (default: %(default)s, evaluate.py's)")
    args = parser.parse_args(argv)
    try:
        rows = {str(path): count_loops(_records(path), args.max_new_tokens) for path in args.caches}
    except FileError as error:
        print(f"loop_report.py: error: {error}", file=sys.stderr)
        return 2
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

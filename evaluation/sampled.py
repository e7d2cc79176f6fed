"""Sampled answers scored as pass@k (`evaluate.py --samples N`): N answers per problem at a temperature,
each run against the problem's tests in the sandbox, beside the greedy answer's pass@1.

Sample j of every problem is drawn with seed `seed + j`, in batches of the problems taken longest first,
each batch seeded anew (gemma/generation.py): the same command on the same tasks, batch size and machine
draws the same answers again. They are cached like greedy answers (the seed is part of the key), so an
interrupted run goes on with the samples it has not drawn.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from common.files import write_jsonl
from evaluation.generation_cache import CachedGenerator
from evaluation.pass_at_k import PassAtK, estimate_pass_at_k
from evaluation.report import Rate, count_passed
from evaluation.sandbox import Limits, run_programs
from gemma.generation import Completion, GenerationSettings

# Chen et al.'s settings: T = 0.8 (with nucleus sampling at 0.95) spreads the answers enough for pass@10;
# at T = 0.2 pass@1 comes closer to the greedy answer's.
DEFAULT_SAMPLES = 20
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
REPORTED_K = (1, 5, 10)


@dataclass(frozen=True)
class ProblemSet:
    """Problems to sample answers for, and how an answer is tested."""
    name: str  # e.g. "humaneval-chat"
    task_ids: list[str]
    prompts: list[str]
    stop_strings: tuple[str, ...]
    program: Callable[[int, str], str]  # (problem index, answer text) -> the program that tests it


@dataclass(frozen=True)
class SampledScore:
    label: str  # the model
    problem_set: str
    samples: int  # per problem
    greedy: Rate  # pass@1 of the greedy answers
    pass_at: list[PassAtK]
    solved: Rate  # problems with at least one passing sample


def sample_settings(settings: GenerationSettings, sample: int) -> GenerationSettings:
    """The settings that draw sample number `sample` (0-based): its own seed."""
    return replace(settings, seed=settings.seed + sample)


def draw_samples(generator: CachedGenerator, problems: ProblemSet, settings: GenerationSettings,
                 samples: int) -> list[list[Completion]]:
    """`samples` answers to every problem: answers[problem][sample]."""
    by_sample = [generator.complete(problems.prompts, problems.stop_strings,
                                    f"{problems.name}, sample {sample + 1}/{samples}", sample_settings(settings, sample))
                 for sample in range(samples)]
    return [list(answers) for answers in zip(*by_sample)]


def score_samples(label: str, problems: ProblemSet, sampled: list[list[Completion]], greedy: list[Completion],
                  settings: GenerationSettings, limits: Limits, workers: int | None, details: Path) -> SampledScore:
    """Run every sampled and greedy answer against its tests; pass@k for each reported k up to the samples
    drawn. Per-answer outcomes (with each sample's seed) go to `details` as JSON lines."""
    samples = len(sampled[0]) if sampled else 0
    programs = [problems.program(index, answer.text) for index, answers in enumerate(sampled) for answer in answers]
    programs += [problems.program(index, answer.text) for index, answer in enumerate(greedy)]
    outcomes = run_programs(programs, limits, workers, f"{label}: running {problems.name}")
    sampled_outcomes = [outcomes[index * samples:(index + 1) * samples] for index in range(len(sampled))]
    greedy_outcomes = outcomes[len(sampled) * samples:]
    passed = [[outcome.passed for outcome in row] for row in sampled_outcomes]
    records = [{"task": task_id, "sample": sample, "seed": sample_settings(settings, sample).seed,
                "text": answer.text, "stop": answer.stop, "passed": outcome.passed, "reason": outcome.reason}
               for task_id, answers, row in zip(problems.task_ids, sampled, sampled_outcomes)
               for sample, (answer, outcome) in enumerate(zip(answers, row))]
    records += [{"task": task_id, "sample": "greedy", "text": answer.text, "stop": answer.stop,
                 "passed": outcome.passed, "reason": outcome.reason}
                for task_id, answer, outcome in zip(problems.task_ids, greedy, greedy_outcomes)]
    write_jsonl(details, records)
    return SampledScore(label, problems.name, samples, count_passed(greedy_outcomes),
                        [estimate_pass_at_k(passed, k) for k in REPORTED_K if k <= samples],
                        Rate(sum(any(row) for row in passed), len(passed)))


def markdown_table(scores: Sequence[SampledScore], settings: GenerationSettings) -> str:
    """One row per model and problem set; percentages with 95% intervals (Wilson for greedy and solved
    counts, bootstrap over problems for pass@k)."""
    ks = sorted({result.k for score in scores for result in score.pass_at})
    lines = [f"Sampled at temperature {settings.temperature}, top-p {settings.top_p}, seeds {settings.seed} + sample "
             f"number; pass@k by the unbiased estimator, 95% bootstrap intervals over problems.", "",
             "| model | problems | samples each | greedy pass@1 | " + " | ".join(f"pass@{k}" for k in ks)
             + " | solved by any sample |",
             "|---" * (5 + len(ks)) + "|"]
    for score in scores:
        by_k = {result.k: str(result) for result in score.pass_at}
        lines.append(f"| {score.label} | {score.problem_set} | {score.samples} | {score.greedy} | "
                     + " | ".join(by_k.get(k, "-") for k in ks) + f" | {score.solved} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, scores: Sequence[SampledScore], settings: GenerationSettings) -> None:
    rows = []
    for score in scores:
        greedy_low, greedy_high = score.greedy.interval_percent
        row = {"model": score.label, "problem_set": score.problem_set, "problems": score.greedy.total,
               "samples": score.samples, "temperature": settings.temperature, "top_p": settings.top_p,
               "first_seed": settings.seed, "greedy_pass1": round(score.greedy.percent, 2),
               "greedy_pass1_ci_low": round(greedy_low, 2), "greedy_pass1_ci_high": round(greedy_high, 2),
               "solved_by_any": score.solved.successes}
        for result in score.pass_at:
            row |= {f"pass{result.k}": round(100 * result.estimate, 2), f"pass{result.k}_ci_low": round(100 * result.low, 2),
                    f"pass{result.k}_ci_high": round(100 * result.high, 2)}
        rows.append(row)
    columns = list(dict.fromkeys(column for row in rows for column in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

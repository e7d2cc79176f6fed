"""make sweep: the exact McNemar test against a brute-force count, paired outcomes read from
evaluate.py's sample files, and a whole sweep on a tiny model that resumes and refuses a foreign run."""

from __future__ import annotations

import csv
import itertools
import json
from fractions import Fraction

import pytest

import sweep
from common.files import FileError
from conftest import build_tiny_model, corpus_row, make_tiny_tokenizer
from evaluation import paired_tests


def brute_force_mcnemar(b: int, c: int) -> Fraction:
    """Every way n = b + c fair coins can fall; the share at least as uneven as b against c."""
    n, observed = b + c, abs(b - c)
    extreme = sum(1 for flips in itertools.product((0, 1), repeat=n) if abs(2 * sum(flips) - n) >= observed)
    return Fraction(extreme, 2**n)


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (1, 9), (9, 1), (3, 3), (2, 7), (0, 6), (5, 12)])
def test_exact_mcnemar_equals_counting_every_outcome(b, c):
    assert paired_tests.exact_mcnemar_p(b, c) == pytest.approx(float(brute_force_mcnemar(b, c)), rel=1e-12)


def test_exact_mcnemar_pinned_values():
    assert paired_tests.exact_mcnemar_p(1, 9) == 22 / 1024  # 2 * (1 + 10) / 2**10
    assert paired_tests.exact_mcnemar_p(0, 0) == 1.0


def write_samples(path, valid: list[bool], chat: list[bool]) -> None:
    records = [{"task": f"held_out/{index}", "code": "", "valid": value} for index, value in enumerate(valid)]
    records += [{"task": f"held_out-doctest/f{index}", "passed": True} for index in range(2)]  # not a measure here
    records += [{"task": f"HumanEval/{index}/{mode}", "passed": value and mode == "chat"}
                for index, value in enumerate(chat) for mode in ("chat", "raw")]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_paired_outcomes_count_the_discordant_items(tmp_path):
    write_samples(tmp_path / "a.jsonl", [True] * 12 + [False] * 3, [True, True, False, False])
    write_samples(tmp_path / "b.jsonl", [True] * 2 + [False] * 13, [True, False, True, False])
    syntax = paired_tests.compare(tmp_path, "a", "b", "syntax valid")
    assert (syntax.a_passed, syntax.b_passed, syntax.items, syntax.only_a, syntax.only_b) == (12, 2, 15, 10, 0)
    assert syntax.p_value == pytest.approx(2 / 1024) and syntax.in_words().startswith("a is better than b")
    chat = paired_tests.compare(tmp_path, "a", "b", "HumanEval chat pass@1")
    assert (chat.a_passed, chat.b_passed, chat.items, chat.only_a, chat.only_b) == (2, 2, 4, 1, 1)
    assert chat.in_words() == "no significant difference (p = 1)"
    table = paired_tests.markdown([syntax, chat])
    assert table.count("\n") == 4 and "| syntax valid | a | b | 12/15 | 2/15 | 10 | 0 |" in table


def test_the_command_line_prints_both_measures_and_names_a_missing_model(tmp_path, capsys):
    write_samples(tmp_path / "a.jsonl", [True, False], [True])
    write_samples(tmp_path / "b.jsonl", [False, False], [True])
    assert paired_tests.main(["a", "b", "--samples", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("| a | b |") == 2
    assert paired_tests.main(["a", "c", "--samples", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("paired_tests.py: error: cannot read ") and "c.jsonl" in error and error.count("\n") == 1


def test_models_scored_on_different_items_are_refused(tmp_path):
    write_samples(tmp_path / "a.jsonl", [True] * 5, [True])
    write_samples(tmp_path / "b.jsonl", [True] * 4, [True])
    with pytest.raises(FileError, match="not scored on the same syntax valid items"):
        paired_tests.compare(tmp_path, "a", "b", "syntax valid")


# ----------------------------------------------------------------------- a whole sweep, tiny

@pytest.fixture
def tiny_sweep(tmp_path):
    build_tiny_model("gemma3").save_pretrained(tmp_path / "model")
    make_tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(corpus_row(index)) + "\n" for index in range(30)))
    return ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "rows.jsonl"),
            "--outputs", str(tmp_path / "outputs"), "--limit", "2"]


def test_a_tiny_sweep_trains_four_runs_compares_them_and_resumes(tiny_sweep, tmp_path, capfd):
    outputs = tmp_path / "outputs"
    assert sweep.main(tiny_sweep) == 0
    first = capfd.readouterr()
    summaries = {run.name: json.loads((outputs / run.name / "train_summary.json").read_text()) for run in sweep.RUNS}
    with (outputs / "model_comparison_limit2.csv").open() as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["reference", "base", "lora_r8", "lora_r16", "lora_r32", "qlora_r16"]
    assert rows["base"]["trainable_params"] == "" and rows["reference"]["held_out_loss"] == ""
    params = {name: int(rows[name]["trainable_params"]) for name in summaries}
    assert params == {name: summary["trainable_params"] for name, summary in summaries.items()}
    assert params["lora_r8"] < params["lora_r16"] == params["qlora_r16"] < params["lora_r32"]
    assert float(rows["lora_r16"]["train_wall_s"]) == summaries["lora_r16"]["wall_s"]
    tests = (outputs / "paired_tests_limit2.md").read_text()
    assert len(tests.splitlines()) == 2 + len(sweep.PAIRS) * len(paired_tests.MEASURES)
    assert "| HumanEval chat pass@1 | lora_r16 | qlora_r16 |" in tests and tests in first.out
    assert (outputs / "training_curves.png").stat().st_size > 0

    # Again: every run is found finished and every generation comes from the cache.
    mtimes = {name: (outputs / name / "adapter_model.safetensors").stat().st_mtime_ns for name in summaries}
    assert sweep.main(tiny_sweep) == 0
    again = capfd.readouterr()
    assert again.out.count("finished earlier") == 4 and "train.py" not in again.out
    assert mtimes == {name: (outputs / name / "adapter_model.safetensors").stat().st_mtime_ns for name in summaries}
    with (outputs / "model_comparison_limit2.csv").open() as handle:
        assert all(row["generated_tokens"] == "0" for row in csv.DictReader(handle))


def test_a_finished_run_of_another_recipe_is_refused_in_one_line(tiny_sweep, tmp_path, capsys):
    folder = tmp_path / "outputs" / "lora_r16"
    folder.mkdir(parents=True)
    (folder / "train_summary.json").write_text(json.dumps({"wall_s": 1.0}))
    recipe = sweep.recipe(sweep.RUNS[0], *tiny_sweep[1:4:2], tmp_path / "outputs")
    (folder / "train_config.json").write_text(json.dumps({**recipe, "epochs": 1}))
    assert sweep.main(tiny_sweep) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith(f"sweep.py: error: {folder} was trained with another recipe: epochs=1 (the sweep's: 3)")

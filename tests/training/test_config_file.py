"""train.py --config FILE: the recipes under recipes/, flags over a file, and bad files."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

import train
from training.arguments import parse_args
from training.config import TrainConfig, resolve_defaults

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
# Where a run goes and what it does to an existing folder are the command line's, not a recipe's.
NOT_IN_RECIPES = {"out", "device", "overwrite"}
STUDY_DATA = ["--model", "google/gemma-2-2b", "--dataset", "iamtarun/python_code_instructions_18k_alpaca"]


@pytest.mark.parametrize("name, flags", [("embedded", []), ("qlora", ["--qlora"]), ("study-gemma-2-2b", STUDY_DATA)])
def test_each_recipe_is_the_run_its_flags_ask_for(name, flags):
    """embedded.yaml is `make train`, qlora.yaml `make qlora`, the study's file the study's model and data."""
    from_file = resolve_defaults(parse_args(["--config", str(RECIPES / f"{name}.yaml")]))
    assert from_file == resolve_defaults(parse_args(flags))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda path: path.name)
def test_each_recipe_sets_every_setting_with_a_comment(path):
    settings = yaml.safe_load(path.read_text())
    assert set(settings) == {field.name for field in dataclasses.fields(TrainConfig)} - NOT_IN_RECIPES
    setting_lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert len(setting_lines) == len(settings) and all("  # " in line for line in setting_lines)


def test_flags_given_as_well_override_the_file():
    config = parse_args(["--config", str(RECIPES / "qlora.yaml"), "--epochs", "1", "--no-qlora", "--rank", "8"])
    assert (config.epochs, config.qlora, config.rank, config.out) == (1, False, 8, "outputs/lora_r8")
    assert config.lr == 1e-3 and config.repetition == 1.0  # the file's


def test_a_file_s_numbers_read_as_numbers(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1e-4\nalpha: 16\nwarmup_steps: 0\ncompile: true\n")
    config = parse_args(["--config", str(recipe)])
    assert (config.lr, config.alpha, config.warmup_steps, config.compile) == (1e-4, 16.0, 0, True)
    assert isinstance(config.alpha, float)


@pytest.mark.parametrize("text, message", [
    ("lrr: 1.0e-3\n", "'lrr' is not a setting (did you mean 'lr'?)"),
    ("token-lr-scale: 2\n", "'token-lr-scale' is not a setting (did you mean 'token_lr_scale'?)"),
    ("epochs: two\n", "epochs: expected a whole number or null, got 'two'"),
    ("epochs: 1.5\n", "epochs: expected a whole number or null, got 1.5"),
    ("qlora: 1\n", "qlora: expected true or false, got 1"),
    ("model: 3\n", "model: expected text, got 3"),
    ("rank: 0\n", "rank: must be >= 1, got 0"),
    ("lr: -1e-3\n", "lr: must be > 0, got -0.001"),
    ("dropout: 1\n", "dropout: must be in [0, 1), got 1.0"),
    ("report_to: wandb\n", "report_to: must be one of none, tensorboard, got 'wandb'"),
    ("world_size: 2\n", "world_size: the run was recorded with 2 processes and this one has 1; start it under "
                        "torchrun --nproc-per-node 2, or delete that line"),
    ("- rank: 8\n", "is not a list of settings (one `name: value` per line)"),
    ("rank: 8\nlr: [1\n", "line 3: not valid YAML"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(capsys, tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", str(recipe), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage above
    assert exit_.value.code == 2 and f"error: {recipe}" in error and message in error
    assert not (tmp_path / "out").exists()


def test_tensorboard_not_installed_is_said_before_any_work(capsys, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "tensorboard" else
                        find_spec(name, *rest))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("report_to: tensorboard\n")
    for args in (["--report-to", "tensorboard"], ["--config", str(recipe)]):
        with pytest.raises(SystemExit) as exit_:
            train.main([*args, "--out", str(tmp_path / "out")])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and "tensorboard is not installed: make tensorboard installs it" in error
    assert not (tmp_path / "out").exists()


def test_a_missing_file_is_named(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", str(tmp_path / "missing.yaml")])
    assert exit_.value.code == 2
    assert f"error: cannot read {tmp_path / 'missing.yaml'}" in capsys.readouterr().err

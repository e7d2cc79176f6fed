"""Averaged adapters (lora/averaging.py, average.py): the update is exactly the mean of the parents', PEFT
reads the result, and bad inputs are refused without writing anything."""

import json

import peft
import pytest
import torch

import average
from conftest import build_tiny_model
from lora import LoRAConfig, inject_lora, inject_trainable_tokens, load_adapter, lora_layers, save_adapter, token_rows

TOKEN_IDS = (4, 5)
IDS = torch.tensor([[2, 4, 10, 40, 5, 77, 4, 120, 5, 9]])


def trained_adapter(kind: str, folder, config: LoRAConfig, seed: int) -> None:
    """Save an adapter whose LoRA matrices and token rows hold random values, as after training."""
    model = build_tiny_model(kind)
    inject_lora(model, config)
    inject_trainable_tokens(model, config.trainable_token_indices)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    save_adapter(model, folder, config)


def loaded(kind: str, folder) -> torch.nn.Module:
    model = build_tiny_model(kind)
    load_adapter(model, folder)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def config(rank: int = 4, alpha: float = 8.0, rslora: bool = False, targets=("q_proj", "v_proj")) -> LoRAConfig:
    return LoRAConfig(rank=rank, alpha=alpha, dropout=0.0, target_modules=targets, use_rslora=rslora,
                      base_model_name_or_path="tiny", trainable_token_indices=TOKEN_IDS)


@pytest.fixture(params=["gemma2", "gemma3"])
def kind(request):
    return request.param


@pytest.fixture
def parents(kind, tmp_path):
    """Two adapters of one model with different ranks and scales (one rsLoRA), so the scale factors matter."""
    trained_adapter(kind, tmp_path / "a", config(rank=4, alpha=8.0), seed=1)
    trained_adapter(kind, tmp_path / "b", config(rank=2, alpha=3.0, rslora=True), seed=2)
    return [tmp_path / "a", tmp_path / "b"]


def test_the_update_and_the_rows_are_the_mean_of_the_parents(kind, parents, tmp_path):
    assert average.main([*map(str, parents), "--out", str(tmp_path / "avg")]) == 0
    averaged, first, second = (loaded(kind, folder) for folder in (tmp_path / "avg", *parents))
    assert json.loads((tmp_path / "avg/adapter_config.json").read_text())["r"] == 6
    layers = [lora_layers(model) for model in (averaged, first, second)]
    assert len(layers[0]) == 4
    for name, layer in layers[0].items():
        expected = (layers[1][name].delta_weight().double() + layers[2][name].delta_weight().double()) / 2
        torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    rows = [token_rows(model)[1].trainable_tokens_delta.double() for model in (averaged, first, second)]
    torch.testing.assert_close(rows[0], (rows[1] + rows[2]) / 2)
    assert not torch.allclose(logits(averaged), logits(first), atol=1e-3), "the second parent counts"


def test_an_adapter_averaged_with_itself_is_itself(kind, parents, tmp_path):
    assert average.main([str(parents[0]), str(parents[0]), "--out", str(tmp_path / "self")]) == 0
    torch.testing.assert_close(logits(loaded(kind, tmp_path / "self")), logits(loaded(kind, parents[0])),
                               rtol=1e-5, atol=1e-5)


def test_peft_loads_the_average_with_our_logits(kind, parents, tmp_path):
    average.main([*map(str, parents), "--out", str(tmp_path / "avg")])
    reference = peft.PeftModel.from_pretrained(build_tiny_model(kind), tmp_path / "avg")
    torch.testing.assert_close(logits(reference), logits(loaded(kind, tmp_path / "avg")), rtol=1e-5, atol=1e-5)


def test_the_nf4_record_is_kept(kind, parents, tmp_path):
    for folder in parents:
        (folder / "train_config.json").write_text('{"qlora": true}')
    average.main([*map(str, parents), "--out", str(tmp_path / "avg")])
    recorded = json.loads((tmp_path / "avg/train_config.json").read_text())
    assert recorded == {"averaged_from": [str(folder) for folder in parents], "qlora": True}


@pytest.mark.parametrize("problem, message", [
    ("other targets", "differ in target_modules"), ("one adapter", "at least two"),
    ("mixed nf4", "NF4 base"), ("out exists", "already exists"), ("no adapter", "no adapter_config.json"),
])
def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(kind, parents, tmp_path, capsys, problem, message):
    out = tmp_path / "avg"
    arguments = [*map(str, parents), "--out", str(out)]
    if problem == "other targets":
        trained_adapter(kind, parents[1], config(targets=("q_proj", "k_proj")), seed=3)
    elif problem == "one adapter":
        arguments = arguments[1:]
    elif problem == "mixed nf4":
        (parents[0] / "train_config.json").write_text('{"qlora": true}')
    elif problem == "out exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        arguments[1] = str(tmp_path / "missing")
    assert average.main(arguments) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    if problem == "out exists":
        assert [path.name for path in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".avg")], "no staging folder left"

"""A QLoRA adapter generates from the computation it was trained with: training's forward (NF4 layers
dequantized at every call, under autocast) and generation's (weights dequantized once) give the same logits."""

import json

import pytest
import torch

from bench import qlora_parity
from common import hardware
from conftest import build_tiny_model, corpus_row, make_tiny_tokenizer
from data.dataset import encode_example
from gemma.generation import Generator
from gemma.loading import load_model
from lora import LoRAConfig, inject_lora, lora_layers, save_adapter


def saved_qlora_adapter(tmp_path):
    """A tiny model's folder, and a QLoRA adapter for it with a non-zero update, as train.py --qlora saves it."""
    model_dir, adapter = tmp_path / "model", tmp_path / "qlora"
    build_tiny_model("gemma3").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    model = load_model(str(model_dir), torch.device("cpu"), torch.float32, nf4=True)
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    inject_lora(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.5)  # a trained adapter, not the zero update of a fresh one
    save_adapter(model, adapter, config)
    (adapter / "train_config.json").write_text(json.dumps({"qlora": True}))
    return model_dir, adapter


def both_ways(model_dir, adapter, dtype: torch.dtype) -> qlora_parity.Agreement:
    device = torch.device("cpu")
    tokenizer = make_tiny_tokenizer()
    examples = [encode_example(tokenizer, row["instruction"], "", row["output"]) for row in map(corpus_row, range(3))]
    trained = qlora_parity.training_model(str(model_dir), str(adapter), device, dtype)
    generating = Generator.load(str(model_dir), str(adapter), "cpu").model
    agreement = qlora_parity.Agreement()
    for example in examples:
        agreement.add(qlora_parity.answer_logits(trained, example, device, dtype, under_autocast=True),
                      qlora_parity.answer_logits(generating, example, device, dtype, under_autocast=False))
    return agreement


def test_in_float32_generation_computes_what_training_did(tmp_path, monkeypatch):
    model_dir, adapter = saved_qlora_adapter(tmp_path)
    monkeypatch.setattr(hardware, "pick_compute_dtype", lambda device: torch.float32)  # what the Generator loads in
    same = both_ways(model_dir, adapter, torch.float32)
    assert same.max_difference < 1e-5 and same.same_top_share == 1.0


def test_in_this_machines_dtype_they_differ_by_its_rounding_only(tmp_path):
    model_dir, adapter = saved_qlora_adapter(tmp_path)
    dtype = hardware.pick_compute_dtype(torch.device("cpu"))
    same = both_ways(model_dir, adapter, dtype)
    first, second = same.mean_losses()
    assert first == pytest.approx(second, rel=1e-3)
    assert same.max_difference < (0.05 if dtype == torch.bfloat16 else 1e-5)


def test_the_command_prints_both_comparisons(tmp_path, capsys):
    model_dir, adapter = saved_qlora_adapter(tmp_path)
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text("".join(json.dumps(corpus_row(index)) + "\n" for index in range(30)))
    assert qlora_parity.main([str(adapter), "--model", str(model_dir), "--dataset", str(dataset), "--rows", "2"]) == 0
    table = capsys.readouterr().out
    assert "| training's forward (NF4 layers, autocast) vs generation's |" in table
    assert "| generation on the NF4 base vs on the float base |" in table

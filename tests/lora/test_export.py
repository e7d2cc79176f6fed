"""export.py, the merged export's command line: a tiny model end to end, and bad output paths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import export
from conftest import build_tiny_model, make_tiny_tokenizer
from lora import LoRAConfig, inject_lora, lora_layers, save_adapter


@pytest.fixture
def tiny_adapter(tmp_path):
    """(model folder, adapter folder, the adapted model's logits on a fixed input)."""
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    model = build_tiny_model("gemma3")
    model.save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    inject_lora(model, LoRAConfig(rank=2, alpha=4.0, dropout=0.0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    save_adapter(model, adapter_dir, LoRAConfig(rank=2, alpha=4.0, dropout=0.0))
    with torch.no_grad():
        logits = model.eval()(torch.tensor([[2, 40, 41, 42]])).logits
    return model_dir, adapter_dir, logits


def test_the_merged_folder_is_a_plain_model_with_the_adapters_outputs(tiny_adapter, tmp_path, capsys):
    model_dir, adapter_dir, logits = tiny_adapter
    out = tmp_path / "merged"
    assert export.main([str(adapter_dir), str(out), "--model", str(model_dir), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(merged(torch.tensor([[2, 40, 41, 42]])).logits, logits, rtol=1e-4, atol=1e-4)
    assert f"merged model written to {out}" in capsys.readouterr().out


@pytest.mark.parametrize("place, message", [
    ("exists", "already exists"),
    ("a-file/merged", "a-file is a file"),
])
def test_a_bad_output_path_is_one_error_line(tiny_adapter, tmp_path, capsys, place, message):
    model_dir, adapter_dir, _ = tiny_adapter
    (tmp_path / "exists").mkdir()
    (tmp_path / "a-file").write_text("precious")
    assert export.main([str(adapter_dir), str(tmp_path / place), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert (tmp_path / "a-file").read_text() == "precious"

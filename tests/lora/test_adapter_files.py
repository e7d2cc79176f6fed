"""Adapter files: our round trip, PEFT reading ours and us reading PEFT's, clear errors, merged export."""

import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from common.files import FileError
from conftest import build_tiny_model, make_tiny_tokenizer
from lora import AdapterError, LoRAConfig, export_merged, inject_lora, load_adapter, lora_layers, save_adapter
from lora.adapter import trained_on_nf4
from quant import quantize_decoder_linears

IDS = torch.tensor([[2, 10, 40, 77, 120, 33, 250, 5, 9]])


def trained_like_adapter(model, seed=1):
    """Give every adapter random non-zero weights, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for weight in (layer.lora_A.weight, layer.lora_B.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(params=["gemma2", "gemma3"])
def kind(request):
    return request.param


@pytest.fixture
def saved_adapter(kind, tmp_path):
    model = build_tiny_model(kind)
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, use_rslora=False, base_model_name_or_path="tiny")
    inject_lora(model, config)
    trained_like_adapter(model)
    save_adapter(model, tmp_path / "adapter", config)
    return model, tmp_path / "adapter"


def test_file_layout_is_peft_s(saved_adapter):
    _, directory = saved_adapter
    tensors = load_file(directory / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with open(directory / "adapter_model.safetensors", "rb") as handle:
        header = handle.read(8 + int.from_bytes(handle.read(8), "little"))
    assert b'"format":"pt"' in header


def test_round_trip_gives_identical_logits(saved_adapter, kind):
    model, directory = saved_adapter
    fresh = build_tiny_model(kind)
    load_adapter(fresh, directory)
    assert torch.equal(logits(fresh), logits(model))


def test_peft_loads_our_adapter_with_identical_logits(saved_adapter, kind):
    model, directory = saved_adapter
    peft_model = peft.PeftModel.from_pretrained(build_tiny_model(kind), directory)
    difference = (logits(peft_model) - logits(model)).abs().max().item()
    assert difference < 1e-5, difference


@pytest.mark.parametrize("use_rslora", [False, True])
def test_we_load_peft_s_adapter_with_identical_logits(kind, tmp_path, use_rslora):
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=use_rslora,
                                  target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(build_tiny_model(kind), peft_config)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = build_tiny_model(kind)
    config = load_adapter(ours, tmp_path / "peft")
    assert config.use_rslora == use_rslora and config.target_modules == ("q_proj", "v_proj")
    difference = (logits(ours) - logits(peft_model)).abs().max().item()
    assert logits(ours).abs().max() > 0 and difference < 1e-5, difference


def test_missing_files_are_clear_errors(tmp_path, kind):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(build_tiny_model(kind), tmp_path)


def test_corrupt_weights_file_is_a_clear_error(saved_adapter, kind):
    _, directory = saved_adapter
    (directory / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(build_tiny_model(kind), directory)


def test_corrupt_config_is_a_clear_error(saved_adapter, kind):
    _, directory = saved_adapter
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(build_tiny_model(kind), directory)


def test_adapter_of_other_shapes_is_refused(saved_adapter, kind):
    _, directory = saved_adapter
    tensors = load_file(directory / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 99)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="has shape"):
        load_adapter(build_tiny_model(kind), directory)


def test_missing_key_is_never_silently_initialised(saved_adapter, kind):
    _, directory = saved_adapter
    tensors = load_file(directory / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="1 missing"):
        load_adapter(build_tiny_model(kind), directory)


def test_module_names_that_do_not_exist_are_refused(saved_adapter, kind):
    _, directory = saved_adapter
    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="does not fit this model"):
        load_adapter(build_tiny_model(kind), directory)


@pytest.mark.parametrize("change", [{"use_dora": True}, {"peft_type": "IA3"}, {"bias": "all"},
                                    {"rank_pattern": {"q_proj": 8}}])
def test_unsupported_configs_are_refused(saved_adapter, kind, change):
    _, directory = saved_adapter
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(change)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="not supported"):
        load_adapter(build_tiny_model(kind), directory)


def test_config_without_rank_is_refused(saved_adapter, kind):
    _, directory = saved_adapter
    config = json.loads((directory / "adapter_config.json").read_text())
    del config["r"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="missing 'r'"):
        load_adapter(build_tiny_model(kind), directory)


@pytest.mark.parametrize("change, message", [
    ({"r": "sixteen"}, "r must be an integer >= 1, got 'sixteen'"),
    ({"r": 0}, "r must be an integer >= 1, got 0"),
    ({"r": 4.5}, "r must be an integer >= 1, got 4.5"),
    ({"lora_alpha": None}, "lora_alpha must be a number > 0, got None"),
    ({"lora_dropout": "high"}, "lora_dropout must be a number >= 0"),
    ({"target_modules": 5}, "target_modules must be a list of module names, got 5"),
    ({"target_modules": []}, "target_modules must be a list of module names, got []"),
])
def test_config_values_of_the_wrong_type_are_one_clear_error(saved_adapter, kind, change, message):
    _, directory = saved_adapter
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(AdapterError, match=re.escape(f"{directory / 'adapter_config.json'}: {message}")):
        load_adapter(build_tiny_model(kind), directory)


def test_no_pickle_files_are_written(saved_adapter):
    _, directory = saved_adapter
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_export_merged_reloads_as_a_plain_model(saved_adapter, kind, tmp_path):
    model, _ = saved_adapter
    expected = logits(model)
    export_merged(model, make_tiny_tokenizer(), tmp_path / "merged", torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    with pytest.raises(FileError, match="already exists"):
        export_merged(model, make_tiny_tokenizer(), tmp_path / "merged", torch.float32)


def test_export_of_a_qlora_model_merges_into_dequantized_weights(kind, tmp_path):
    model = build_tiny_model(kind)
    quantize_decoder_linears(model)
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    trained_like_adapter(model)
    expected = logits(model)
    export_merged(model, make_tiny_tokenizer(), tmp_path / "merged", torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-4, atol=1e-4)


def test_trained_on_nf4_reads_train_py_s_record(tmp_path):
    assert not trained_on_nf4(tmp_path)  # PEFT's adapters carry no record: a float base
    (tmp_path / "train_config.json").write_text('{"qlora": true}')
    assert trained_on_nf4(tmp_path)
    (tmp_path / "train_config.json").write_text('{"qlora": false}')
    assert not trained_on_nf4(tmp_path)

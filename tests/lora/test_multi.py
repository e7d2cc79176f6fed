"""lora/multi.py: several adapters on one base, chosen per batch row, against each adapter loaded alone."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from lora import AdapterError, LoRAConfig, inject_lora, inject_trainable_tokens, load_adapter, save_adapter
from lora.multi import AdapterSet

CONFIGS = {
    "markers": LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"),
                          trainable_token_indices=[4, 5]),
    "plain": LoRAConfig(rank=2, alpha=2.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    "all": LoRAConfig(rank=8, alpha=4.0, dropout=0.0, target_modules="all-linear", trainable_token_indices=[5]),
}
# Row 0 holds both turn markers (ids 4 and 5) whose rows two of the adapters replace.
INPUT = torch.tensor([[2, 4, 40, 41, 5, 60], [2, 70, 71, 72, 73, 74], [2, 5, 80, 4, 81, 82], [2, 90, 91, 4, 5, 92]])


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def adapters(request, tmp_path_factory) -> tuple[str, dict]:
    folders = {}
    for seed, (name, config) in enumerate(CONFIGS.items(), 1):
        model = build_tiny_model(request.param)
        inject_lora(model, config)
        if config.trainable_token_indices:
            inject_trainable_tokens(model, config.trainable_token_indices)
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name or "trainable_tokens_delta" in parameter_name:
                    parameter.normal_(0, 1.0)
        folders[name] = tmp_path_factory.mktemp(name)
        save_adapter(model, folders[name], config)
    return request.param, folders


def alone_logits(kind: str, folder) -> torch.Tensor:
    model = build_tiny_model(kind)
    if folder is not None:
        load_adapter(model, folder)
    with torch.no_grad():
        return model(INPUT).logits


@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [3, 3, 1, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
def test_each_row_computes_what_its_adapter_alone_does(adapters, slots):
    kind, folders = adapters
    names = list(folders)
    model = build_tiny_model(kind)
    shared = AdapterSet(model)
    assert [shared.add(name, folders[name]) for name in names] == [1, 2, 3]
    with torch.no_grad(), shared.selected(slots):
        mixed = model(INPUT).logits
    for row, slot in enumerate(slots):
        expected = alone_logits(kind, folders[names[slot - 1]] if slot else None)[row]
        torch.testing.assert_close(mixed[row], expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # outside `selected`: the base model
        torch.testing.assert_close(model(INPUT).logits, alone_logits(kind, None), rtol=1e-5, atol=1e-5)


def test_the_adapters_differ_and_the_base_is_held_once(adapters):
    kind, folders = adapters
    model = build_tiny_model(kind)
    base_parameters = {id(parameter) for parameter in model.parameters()}
    shared = AdapterSet(model)
    for name, folder in folders.items():
        shared.add(name, folder)
    assert {id(parameter) for parameter in model.parameters()} == base_parameters  # nothing of the base copied
    with torch.no_grad(), shared.selected([1, 2, 3, 0]):
        row_logits = model(INPUT[[0, 0, 0, 0]]).logits
    assert all(not torch.allclose(row_logits[i], row_logits[j]) for i in range(4) for j in range(i + 1, 4))


def test_a_bad_adapter_is_refused_and_the_set_stays_as_it_was(adapters, tmp_path):
    kind, folders = adapters
    model = build_tiny_model(kind)
    shared = AdapterSet(model)
    shared.add("markers", folders["markers"])
    with torch.no_grad(), shared.selected([1, 1, 0, 0]):
        before = model(INPUT).logits
    (tmp_path / "adapter_config.json").write_text((folders["plain"] / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"damaged")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        shared.add("broken", tmp_path)
    assert shared.names == ["markers"]
    with torch.no_grad(), shared.selected([1, 1, 0, 0]):
        torch.testing.assert_close(model(INPUT).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="slots must be in"):
        with shared.selected([2, 0, 0, 0]):
            pass

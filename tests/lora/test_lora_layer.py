"""The LoRA layer's maths, pinned against float64 references."""

import math

import pytest
import torch
from torch import nn

from lora import LoRAConfig, LoRALinear, inject_lora, lora_layers, merge_all, unmerge_all


def make_layer(rank=4, alpha=8.0, dropout=0.0, use_rslora=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 10, bias=True).to(dtype).requires_grad_(False)
    return LoRALinear(base, rank, alpha, dropout, use_rslora)


def randomize_adapter(layer: LoRALinear, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=generator))
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_adapter_changes_nothing_exactly(dtype):
    layer = make_layer(dtype=dtype)
    x = torch.randn(3, 5, 12).to(dtype)
    assert torch.equal(layer(x), layer.base(x))
    assert layer(x).dtype == dtype


def test_init_is_kaiming_uniform_for_A_and_zero_for_B():
    layer = make_layer(rank=4)
    bound = 1 / math.sqrt(12)  # kaiming_uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > bound / 2
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_adapter_weights_stay_float32_on_a_bf16_base():
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_float64_maths(use_rslora):
    layer = make_layer(rank=4, alpha=8.0, use_rslora=use_rslora)
    randomize_adapter(layer)
    x = torch.randn(7, 12)
    scale = 8.0 / (math.sqrt(4) if use_rslora else 4)
    assert layer.scaling == pytest.approx(scale)
    W, b = layer.base.weight.double(), layer.base.bias.double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    expected = x.double() @ W.T + b + scale * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_pinned_values():
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    layer = LoRALinear(base, rank=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[3.0], [-1.0]]))
    # x = [1, 1]: base -> [1, 1]; A x = 3; B A x = [9, -3]; scale 2 -> [18, -6]; sum [19, -5]
    assert layer(torch.tensor([[1.0, 1.0]])).tolist() == [[19.0, -5.0]]


def test_dropout_only_in_training_mode():
    layer = make_layer(dropout=0.5)
    randomize_adapter(layer)
    x = torch.randn(64, 12)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    assert not torch.equal(first, layer(x))
    # Disabled, the layer is exactly its base (and the base path never sees dropout).
    layer.disabled = True
    assert torch.equal(layer(x), layer.base(x))


def test_a_merged_layer_disabled_is_its_base_again():
    layer = make_layer()
    randomize_adapter(layer)
    x = torch.randn(6, 12)
    base_out = layer.base(x)
    layer.merge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), base_out, rtol=1e-5, atol=1e-5)
    layer.disabled = False
    layer.unmerge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), base_out, rtol=1e-5, atol=1e-5)  # unmerge rounds in float32


def test_merge_matches_adapter_forward_and_is_idempotent():
    layer = make_layer()
    randomize_adapter(layer)
    x = torch.randn(6, 12)
    original_weight = layer.base.weight.clone()
    adapter_out = layer(x)
    layer.merge()
    merged_out = layer(x)
    torch.testing.assert_close(merged_out, adapter_out, rtol=1e-5, atol=1e-5)
    merged_weight = layer.base.weight.clone()
    layer.merge()
    assert torch.equal(layer.base.weight, merged_weight), "merging twice must equal merging once"
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, original_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), adapter_out, rtol=1e-5, atol=1e-5)


def test_optimizer_step_changes_only_adapter_tensors(tiny_model):
    inject_lora(tiny_model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    tiny_model.train()
    ids = torch.randint(0, 200, (2, 12))
    for _ in range(2):  # the first step only moves B (A's gradient is zero while B is zero)
        loss = tiny_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, parameter in tiny_model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
    after = tiny_model.state_dict()
    for name, tensor in before.items():
        if ".lora_" in name:
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"frozen {name} changed"


def test_inject_targets_attention_by_default_and_never_embeddings(tiny_model):
    names = inject_lora(tiny_model)
    assert len(names) == 4 * tiny_model.config.num_hidden_layers
    assert all(name.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"} for name in names)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_inject_all_linear_skips_lm_head(tiny_model):
    names = inject_lora(tiny_model, LoRAConfig(target_modules="all-linear"))
    assert len(names) == 7 * tiny_model.config.num_hidden_layers
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_inject_unknown_target_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="no linear layer"):
        inject_lora(tiny_model, LoRAConfig(target_modules=("nonexistent_proj",)))


def test_model_level_merge_round_trip(tiny_model):
    inject_lora(tiny_model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    for layer in lora_layers(tiny_model).values():
        randomize_adapter(layer)
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        adapter_logits = tiny_model(ids).logits
        merge_all(tiny_model)
        merge_all(tiny_model)
        merged_logits = tiny_model(ids).logits
        unmerge_all(tiny_model)
        unmerged_logits = tiny_model(ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unmerged_logits, adapter_logits, rtol=1e-4, atol=1e-4)


def test_injected_layers_follow_the_model_s_mode(tiny_model):
    tiny_model.eval()
    inject_lora(tiny_model, LoRAConfig(dropout=0.5))
    assert all(not layer.training for layer in lora_layers(tiny_model).values())
    tiny_model.train()
    assert all(layer.dropout.training for layer in lora_layers(tiny_model).values())

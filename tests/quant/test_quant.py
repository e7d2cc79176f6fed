"""NF4 layers against bitsandbytes' own Linear4bit, and QLoRA parity with LoRA on dequantized weights."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lora import LoRAConfig, LoRALinear, inject_lora, lora_layers
from quant import NF4Linear, decoder_linear_names, quantize_decoder_linears


def float_linear(seed=0, in_features=128, out_features=96, bias=False):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_equals_bitsandbytes_linear4bit(dtype):
    linear = float_linear(bias=True)
    ours = NF4Linear(linear)
    reference = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    reference.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
    reference.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    reference = reference.to("cpu")  # bitsandbytes quantizes when the module is moved to its device
    assert torch.equal(ours.packed_weight, reference.weight.data)
    x = torch.randn(4, 7, 128).to(dtype)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_nf4_weights_are_close_to_the_float_weights_and_double_quantized():
    linear = float_linear()
    nf4 = NF4Linear(linear)
    assert nf4.quant_state.nested, "block scales should be double-quantized"
    error = (nf4.dequantized_weight() - linear.weight).abs().max() / linear.weight.abs().max()
    assert 0 < error < 0.2  # 16 levels, widest gap ~0.28 of a block's absmax: lossy, far from random
    assert nf4.storage_bytes() < linear.weight.numel() * 4 / 6


def test_gradient_flows_to_the_input():
    nf4 = NF4Linear(float_linear())
    x = torch.randn(3, 128, requires_grad=True)
    nf4(x).sum().backward()
    expected = nf4.dequantized_weight().sum(0).expand(3, -1)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_qlora_equals_lora_over_the_dequantized_weights():
    linear = float_linear(bias=True)
    nf4 = NF4Linear(linear)
    qlora = LoRALinear(nf4, rank=8, alpha=16.0)
    lora = LoRALinear(nf4.to_linear(torch.float32), rank=8, alpha=16.0)
    with torch.no_grad():
        torch.manual_seed(3)
        for name in ("lora_A", "lora_B"):
            value = torch.randn_like(getattr(qlora, name).weight)
            getattr(qlora, name).weight.copy_(value)
            getattr(lora, name).weight.copy_(value)
    x = torch.randn(5, 128)
    out_q, out_l = qlora(x), lora(x)
    torch.testing.assert_close(out_q, out_l, rtol=1e-5, atol=1e-5)
    out_q.square().sum().backward()
    out_l.square().sum().backward()
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(qlora, name).weight.grad, getattr(lora, name).weight.grad,
                                   rtol=1e-4, atol=1e-4)


def test_quantize_swaps_every_decoder_linear_and_nothing_else(tiny_model):
    expected = decoder_linear_names(tiny_model)
    assert len(expected) == 7 * tiny_model.config.num_hidden_layers
    before, after = quantize_decoder_linears(tiny_model)
    for name, module in tiny_model.named_modules():
        if name in expected:
            assert isinstance(module, NF4Linear), name
    assert isinstance(tiny_model.lm_head, nn.Linear)
    assert isinstance(tiny_model.model.embed_tokens, nn.Embedding)
    # 4 bits a weight vs 32; in a model this tiny the per-layer lookup tables still show.
    assert after < before / 5
    logits = tiny_model(torch.randint(0, 200, (1, 6))).logits
    assert torch.isfinite(logits).all()


def test_qlora_model_trains_only_adapters(tiny_model):
    quantize_decoder_linears(tiny_model)
    inject_lora(tiny_model, LoRAConfig(rank=4, alpha=8.0))
    assert all(isinstance(layer.base, NF4Linear) for layer in lora_layers(tiny_model).values())
    ids = torch.randint(0, 200, (2, 8))
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)

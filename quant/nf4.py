"""NF4 (4-bit NormalFloat) linear layers on bitsandbytes' own kernels, as QLoRA uses them.

The weight is quantized once by `bitsandbytes.functional.quantize_4bit` (blocks of 64, double
quantization of the block scales) and multiplied by `bitsandbytes.matmul_4bit`, which dequantizes
on the fly and lets gradients flow to the input. No quantization maths is written here.
"""

from __future__ import annotations

import logging

# bitsandbytes warns on import that an optional CPU kernel package (`kernels`) is missing; it
# cannot be installed here and its fallback is what we use, so the warning is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402  (after the logger is quietened)
import bitsandbytes.functional as bnb_functional  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.modules import replace_module  # noqa: E402

BLOCKSIZE = 64


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4; computes in the input's dtype.

    `compute_dtype` is the dtype the weight is dequantized to (default: the original weight's),
    so a weight quantized from float32 can be used directly by a bf16 model.
    """

    is_linear_like = True  # lets LoRA injection treat it as a linear layer

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.quantized_parameter_count = linear.weight.numel()
        packed, self.quant_state = bnb_functional.quantize_4bit(
            linear.weight.detach(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )
        if compute_dtype is not None:
            self.quant_state.dtype = compute_dtype
        self.register_buffer("packed_weight", packed)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.packed_weight.t(), quant_state=self.quant_state, bias=bias)

    def dequantized_weight(self) -> torch.Tensor:
        return bnb_functional.dequantize_4bit(self.packed_weight, self.quant_state)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (what merging and export start from)."""
        weight = self.dequantized_weight()
        dtype = dtype or weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def storage_bytes(self) -> int:
        """Bytes of the packed weight and its quantization statistics."""
        state = self.quant_state
        tensors = [self.packed_weight, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to() moves buffers; the quantization statistics live outside them.
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed_weight.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocksize={BLOCKSIZE}"


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear inside the decoder blocks (attention and MLP); never embeddings or lm_head."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in f".{name}"]


def quantize_decoder_linears(model: nn.Module, compute_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Swap the decoder's linear layers for NF4Linear in place, on whatever device they are on.

    Returns (weight bytes before, weight bytes after) over the swapped layers.
    """
    before = after = 0
    for name in decoder_linear_names(model):
        linear = model.get_submodule(name)
        before += linear.weight.numel() * linear.weight.element_size()
        quantized = NF4Linear(linear, compute_dtype)
        after += quantized.storage_bytes()
        replace_module(model, name, quantized)
    return before, after


def dequantize_decoder_linears(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Swap every NF4Linear back for a plain nn.Linear holding its dequantized weight (in `dtype`, by
    default the compute dtype); returns how many.

    The weights keep their 4-bit rounding (what a QLoRA adapter was trained against); only the
    per-call dequantization goes. On the CPU, bitsandbytes computes exactly this (dequantize, then a
    plain matmul) at every call, so the outputs are the same bit for bit.
    """
    swapped = [(name, module) for name, module in model.named_modules() if isinstance(module, NF4Linear)]
    for name, module in swapped:
        replace_module(model, name, module.to_linear(dtype))
    return len(swapped)

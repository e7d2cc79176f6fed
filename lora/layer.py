"""The LoRA layer: a frozen linear map plus a trainable low-rank update."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """s in LoRALinear's formula: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def low_rank_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B(A(x)) for weights A [r, in] and B [out, r]. Without autocast it is computed in the weights'
    dtype (float32); under it, autocast picks the dtype of the two small matmuls and a cast here would
    only cost a copy."""
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(lora_A.dtype)
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


class LoRALinear(nn.Module):
    """Wraps a frozen linear-like module `base` (nn.Linear, or quant.NF4Linear) with a low-rank update.

        y = base(x) + s * B(A(dropout(x)))      A: [r, in], B: [out, r]
        s = alpha / r            (standard LoRA)
        s = alpha / sqrt(r)      (rsLoRA, which keeps the update's scale stable as r grows)

    A starts kaiming-uniform (a=sqrt(5), as nn.Linear does) and B at zero, so a fresh adapter leaves
    the output unchanged. A and B are float32 whatever the base's dtype: small low-precision updates
    would round away. The result is returned in the input's dtype.

    `disabled` turns the update off (the base model's behaviour, e.g. for a reference forward), merged
    or not: from a merged weight the update is subtracted again.
    `merge()` folds s * B @ A into the base weight so inference costs nothing extra; `unmerge()` takes
    it back out. Both are idempotent.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.disabled and self.merged:  # the update is inside the base weight: take it out again
            return (result - self._update(x)).to(x.dtype)
        if self.disabled or self.merged:
            return result
        return (result + self._update(self.dropout(x))).to(x.dtype)

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_update(x, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in float32: the change this adapter makes to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self._float_base_weight()
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._float_base_weight()
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def _float_base_weight(self) -> torch.Tensor:
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            # Adding the update to a 4-bit weight would re-quantize it and lose what was learned.
            raise TypeError(
                f"cannot merge into a {type(self.base).__name__} base in place; "
                "export a merged model instead (export.py, lora.export_merged), which dequantizes first"
            )
        return weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")

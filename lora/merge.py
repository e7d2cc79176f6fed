"""A merged model: the adapter folded into full-precision base weights, saved as a normal Hugging
Face model folder (with its tokenizer) that needs neither this toolkit nor PEFT. (Command line:
export.py.)

On an NF4 base the update is added to the dequantized weights in float32: the adapter learned to
correct *that* base. The result is never re-quantized, which would round away much of what was learned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from common.files import write_folder
from common.modules import replace_module

from .inject import lora_layers
from .tokens import merge_token_rows


def merge_into_plain_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace each LoRALinear by an nn.Linear with weight W + s·B·A (computed in float32), and each
    remaining 4-bit layer by its dequantized nn.Linear; write trainable token rows into the embedding
    (and so into a tied head). Works on float and NF4 bases alike."""
    merge_token_rows(model)
    for name, layer in lora_layers(model).items():
        merged = _plain_linear(layer.base, torch.float32)
        with torch.no_grad():
            merged.weight += layer.delta_weight().to(merged.weight.device)
        replace_module(model, name, merged.to(dtype))
    for name, module in list(model.named_modules()):
        if hasattr(module, "to_linear"):
            replace_module(model, name, module.to_linear(dtype))


def export_merged(model: nn.Module, tokenizer, directory: str | Path, dtype: torch.dtype) -> None:
    """Merge and save to `directory`, which must not exist yet (nothing is overwritten)."""
    def write(staging: Path) -> None:
        merge_into_plain_linears(model, dtype)
        model.config.dtype = dtype
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_folder(Path(directory), write, "merged model")


def _plain_linear(base: nn.Module, dtype: torch.dtype) -> nn.Linear:
    if hasattr(base, "to_linear"):
        return base.to_linear(dtype)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=dtype)
    linear.load_state_dict({key: value.to(dtype) for key, value in base.state_dict().items()})
    return linear.requires_grad_(False)

"""Putting LoRA layers into a model, freezing everything else, and counting what trains."""

from __future__ import annotations

from torch import nn

from common.modules import replace_module

from .config import ALL_LINEAR, EXCLUDED_MODULES, LoRAConfig
from .layer import LoRALinear
from .tokens import ROWS_NAME


def find_target_names(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """Full names of the linear layers to adapt, matched on the last part of the module name."""
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        # Any part: a head wrapped for trainable token rows keeps its linear layer one level down.
        if set(parts) & set(EXCLUDED_MODULES) or not _is_linear_like(module):
            continue
        last = parts[-1]
        if targets == ALL_LINEAR or last in targets:
            names.append(name)
    if not names:
        raise ValueError(f"no linear layer of the model matches target modules {targets!r}")
    return names


def lora_parameter_count(model: nn.Module, config: LoRAConfig) -> int:
    """How many numbers inject_lora would add (r x (in + out) per adapted layer), before it allocates them."""
    return sum(config.rank * (layer.in_features + layer.out_features)
               for layer in map(model.get_submodule, find_target_names(model, config.target_modules)))


def inject_lora(model: nn.Module, config: LoRAConfig = LoRAConfig()) -> list[str]:
    """Replace each linear layer `config` targets by a LoRALinear around it; freeze all but the
    adapters. Returns the names of the adapted modules. (Token rows: tokens.inject_trainable_tokens.)
    """
    names = find_target_names(model, config.target_modules)
    for name in names:
        layer = LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout, config.use_rslora)
        # A new module starts in training mode; it must follow the model's (dropout off in eval).
        replace_module(model, name, layer.train(model.training))
    mark_only_lora_as_trainable(model)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Adapters (and trainable token rows, if any) train; every base weight is frozen."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name or name.endswith(f".{ROWS_NAME}"))


def merge_all(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_all(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    # A 4-bit layer keeps its packed weight as a buffer, not a parameter.
    for module in model.modules():
        total += getattr(module, "quantized_parameter_count", 0)
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """The one-line summary PEFT users know, e.g.
    `trainable params: 6,389,760 || all params: 2,620,731,648 || trainable%: 0.2438`."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or getattr(module, "is_linear_like", False)

"""Helpers on torch modules that the model surgery (LoRA injection, NF4 quantization, merging) shares."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` (a dotted path) is."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)

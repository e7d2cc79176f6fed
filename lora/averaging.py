"""The average of several LoRA adapters of one base model, written as one adapter whose update is
exactly the mean of theirs: a "model soup" of training runs that differ only in their seed.

For adapters i = 1..n with scales s_i (alpha_i / r_i, or alpha_i / sqrt(r_i) with rsLoRA), the mean
update of a layer is

    (1/n) sum_i s_i B_i A_i  =  s [c_1 B_1 | ... | c_n B_n] [A_1; ...; A_n],   c_i = s_i / (n s),

a LoRA of rank r_1 + ... + r_n whose A matrices are stacked and B matrices side by side, with scale s
from the first adapter's alpha and rsLoRA setting at the new rank. With equal configs and no rsLoRA,
c_i = 1 exactly. Trainable token rows are stored whole, so their average is the row-wise mean, which is
also what merging the average into the embedding gives. Nothing here is approximate: merged, the
average equals the mean of the merged models' weights (up to float32 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .adapter import read_adapter_config, read_adapter_weights
from .config import AdapterError, LoRAConfig
from .layer import lora_scaling


def average_adapters(directories: Sequence[str | Path]) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The averaged adapter's config and tensors (PEFT's key names) for two or more adapter folders."""
    if len(directories) < 2:
        raise AdapterError("averaging needs at least two adapters")
    configs = [read_adapter_config(directory) for directory in directories]
    weights = [read_adapter_weights(directory) for directory in directories]
    for directory, config, tensors in zip(directories[1:], configs[1:], weights[1:]):
        _check_compatible(directories[0], configs[0], weights[0], directory, config, tensors)
    rank = sum(config.rank for config in configs)
    averaged_config = replace(configs[0], rank=rank)
    target_scale = lora_scaling(averaged_config.alpha, rank, averaged_config.use_rslora)
    factors = [lora_scaling(config.alpha, config.rank, config.use_rslora) / (len(configs) * target_scale)
               for config in configs]
    averaged = {}
    for key in weights[0]:
        parts = [tensors[key].float() for tensors in weights]
        if key.endswith("lora_A.weight"):
            averaged[key] = torch.cat(parts, dim=0)
        elif key.endswith("lora_B.weight"):
            averaged[key] = torch.cat([factor * part for factor, part in zip(factors, parts)], dim=1)
        else:  # whole token rows
            averaged[key] = torch.stack(parts).mean(dim=0)
    return averaged_config, averaged


def _check_compatible(first: str | Path, first_config: LoRAConfig, first_weights: dict[str, torch.Tensor],
                      other: str | Path, config: LoRAConfig, weights: dict[str, torch.Tensor]) -> None:
    """Raise AdapterError unless `other` adapts the same modules and token rows of the same base."""
    for field in ("target_modules", "trainable_token_indices", "base_model_name_or_path"):
        if getattr(config, field) != getattr(first_config, field):
            raise AdapterError(f"{other} and {first} differ in {field} ({getattr(config, field)!r} vs "
                               f"{getattr(first_config, field)!r}); only adapters of one recipe average")
    if weights.keys() != first_weights.keys():
        raise AdapterError(f"{other} and {first} hold different layers; only adapters of one model average")
    for key, tensor in weights.items():
        if _layer_shape(key, tensor) != _layer_shape(key, first_weights[key]):
            raise AdapterError(f"{other}: {key} has shape {list(tensor.shape)}, "
                               f"{first} {list(first_weights[key].shape)}")


def _layer_shape(key: str, tensor: torch.Tensor) -> tuple[int, ...]:
    """What must agree between adapters: a LoRA matrix's layer side (its rank side may differ), or the
    whole shape of anything else."""
    if key.endswith("lora_A.weight"):
        return tuple(tensor.shape[1:])  # in_features
    if key.endswith("lora_B.weight"):
        return tuple(tensor.shape[:1])  # out_features
    return tuple(tensor.shape)

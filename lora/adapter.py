"""Adapter files in PEFT's layout, so PEFT and vLLM-style loaders read ours and we read theirs.

    adapter_model.safetensors   metadata {"format": "pt"}; keys
                                base_model.model.<module path>.lora_A.weight  [r, in]
                                base_model.model.<module path>.lora_B.weight  [out, r]
                                base_model.model.<embedding path>.token_adapter.trainable_tokens_delta
                                    [n, hidden]: full rows of the trainable tokens, if any
    adapter_config.json         peft_type, task_type, r, lora_alpha, lora_dropout, target_modules,
                                bias, use_rslora, base_model_name_or_path, and trainable_token_indices
                                (a list of ids) when rows are trained

Only safetensors and JSON are read or written: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.files import atomic_write

from .config import AdapterError, LoRAConfig
from .inject import inject_lora, lora_layers
from .tokens import ROWS_NAME, inject_trainable_tokens, token_rows

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names, as contiguous float32 CPU tensors."""
    return {key: parameter.detach().float().cpu().contiguous()
            for key, parameter in _adapter_parameters(model).items()}


def save_adapter(model: nn.Module, directory: str | Path, config: LoRAConfig) -> None:
    """Write both files atomically (temporary file, fsync, rename): a crash never leaves half a file."""
    tensors = adapter_state_dict(model)
    if not tensors:
        raise AdapterError("the model has no LoRA layers to save")
    save_adapter_tensors(tensors, directory, config)


def save_adapter_tensors(tensors: dict[str, torch.Tensor], directory: str | Path, config: LoRAConfig) -> None:
    """save_adapter for tensors already under PEFT's key names (e.g. an average of adapters)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(config.to_peft_json(), indent=2) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(text))


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"no {CONFIG_NAME} in {directory}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} does not hold a JSON object")
    return LoRAConfig.from_peft_json(raw, str(path))


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path} is not a readable safetensors file: {error}") from None


def load_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Inject LoRA layers as the adapter's config says and load its weights (in place).

    Every expected tensor must be present with the right shape, and nothing else: a missing key is
    never silently left at its initial value.
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_weights(directory)
    try:
        inject_lora(model, config)
        if config.trainable_token_indices:
            inject_trainable_tokens(model, config.trainable_token_indices)
    except ValueError as error:
        raise AdapterError(f"adapter in {directory} does not fit this model: {error}") from None
    load_adapter_tensors(model, tensors, str(directory))
    return config


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = _adapter_parameters(model)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise AdapterError(
            f"adapter {source} does not match this model's modules ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys; first {detail})"
        )
    with torch.no_grad():
        for key, parameter in expected.items():
            if tensors[key].shape != parameter.shape:
                raise AdapterError(
                    f"adapter {source}: {key} has shape {list(tensors[key].shape)}, "
                    f"the model needs {list(parameter.shape)}"
                )
            parameter.copy_(tensors[key])


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    parameters = {}
    for name, layer in lora_layers(model).items():
        parameters[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        parameters[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    rows = token_rows(model)
    if rows is not None:
        embedding_name, adapter = rows
        parameters[f"{KEY_PREFIX}{embedding_name}.token_adapter.{ROWS_NAME}"] = adapter.trainable_tokens_delta
    return parameters


# Training writes its settings here, beside the adapter; "qlora": true means it was trained on an NF4 base.
TRAINING_CONFIG_NAME = "train_config.json"


def trained_on_nf4(directory: str | Path) -> bool:
    """Whether training this adapter on an NF4 base (then it should meet that base again).
    Adapters from elsewhere (PEFT) carry no such record and count as trained on a float base."""
    path = Path(directory) / TRAINING_CONFIG_NAME
    try:
        return bool(json.loads(path.read_text()).get("qlora", False))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def adapter_folders(root: Path) -> list[Path]:
    """The adapter folders directly under `root` (those holding an adapter_config.json), by name."""
    return sorted(config.parent for config in Path(root).glob(f"*/{CONFIG_NAME}"))

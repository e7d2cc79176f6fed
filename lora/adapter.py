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
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import ALL_LINEAR, inject_lora, lora_layers
from .tokens import ROWS_NAME, inject_trainable_tokens, token_rows

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
# train.py writes its settings here, beside the adapter; "qlora": true means it was trained on an NF4 base.
TRAINING_CONFIG_NAME = "train_config.json"

# Features of PEFT's LoRA config that change the maths; we refuse adapters that use them rather than
# load them wrongly. Each maps to the value that means "not used".
UNSUPPORTED_WHEN_SET = {
    "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
    "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
    "use_qalora": False, "megatron_config": None,
}


class AdapterError(ValueError):
    """An adapter cannot be saved or loaded; the message is one line meant for the user."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    base_model_name_or_path: str = ""
    trainable_token_indices: tuple[int, ...] = ()  # rows of the input (and tied output) embedding trained too

    def to_peft_json(self) -> dict:
        targets = self.target_modules if self.target_modules == ALL_LINEAR else list(self.target_modules)
        raw = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "target_modules": targets, "bias": "none",
            "use_rslora": self.use_rslora, "base_model_name_or_path": self.base_model_name_or_path,
        }
        if self.trainable_token_indices:  # written only when used: older PEFT versions reject the key
            raw["trainable_token_indices"] = list(self.trainable_token_indices)
        return raw

    @classmethod
    def from_peft_json(cls, raw: dict, source: str) -> LoRAConfig:
        if raw.get("peft_type") != "LORA":
            raise AdapterError(f"{source}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
        if raw.get("bias", "none") != "none":
            raise AdapterError(f"{source}: bias={raw['bias']!r} is not supported (only 'none')")
        for key, unused in UNSUPPORTED_WHEN_SET.items():
            if raw.get(key, unused) not in (unused, None, False, {}, []):
                raise AdapterError(f"{source}: {key}={raw[key]!r} is not supported")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in raw:
                # PEFT would silently default r and lora_alpha to 8; a wrong scale is worse than an error.
                raise AdapterError(f"{source}: missing {key!r}")
        targets = raw["target_modules"]
        if isinstance(targets, str) and targets != ALL_LINEAR:
            raise AdapterError(f"{source}: target_modules as a regular expression ({targets!r}) is not supported")
        return cls(
            rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
            use_rslora=bool(raw.get("use_rslora", False)),
            base_model_name_or_path=raw.get("base_model_name_or_path") or "",
            trainable_token_indices=_token_indices(raw.get("trainable_token_indices"), source),
        )


def _token_indices(value: object, source: str) -> tuple[int, ...]:
    """PEFT's `trainable_token_indices`: a list of ids for the input embedding, or a dict keyed by the
    embedding's name; only the input embedding (`embed_tokens`) is supported."""
    if isinstance(value, dict):
        if set(value) != {"embed_tokens"}:
            raise AdapterError(f"{source}: trainable_token_indices for {sorted(value)} is not supported "
                               "(only embed_tokens)")
        value = value["embed_tokens"]
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise AdapterError(f"{source}: trainable_token_indices must be a list of token ids, got {value!r}")
    return tuple(value)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names, as contiguous float32 CPU tensors."""
    return {key: parameter.detach().float().cpu().contiguous()
            for key, parameter in _adapter_parameters(model).items()}


def save_adapter(model: nn.Module, directory: str | Path, config: LoRAConfig) -> None:
    """Write both files atomically (temporary file, fsync, rename): a crash never leaves half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    if not tensors:
        raise AdapterError("the model has no LoRA layers to save")
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


def trained_on_nf4(directory: str | Path) -> bool:
    """Whether train.py trained this adapter on an NF4 base (then it should meet that base again).
    Adapters from elsewhere (PEFT) carry no such record and count as trained on a float base."""
    path = Path(directory) / TRAINING_CONFIG_NAME
    try:
        return bool(json.loads(path.read_text()).get("qlora", False))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


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
        inject_lora(model, config.target_modules, config.rank, config.alpha, config.dropout, config.use_rslora)
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


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call write(temporary path) in path's folder, fsync, then rename over path."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)

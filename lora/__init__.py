"""Hand-written LoRA: the layer, its injection into a model, trainable token rows, and adapter files in
PEFT's layout, and the exact average of several adapters."""

from .adapter import load_adapter, read_adapter_config, save_adapter, save_adapter_tensors
from .averaging import average_adapters
from .config import ALL_LINEAR, ATTENTION_MODULES, AdapterError, LoRAConfig, parse_target_modules
from .inject import (
    count_parameters, inject_lora, lora_layers, lora_parameter_count, mark_only_lora_as_trainable, merge_all,
    trainable_report, unmerge_all,
)
from .layer import LoRALinear
from .merge import export_merged, merge_into_plain_linears
from .tokens import describe_token_rows, inject_trainable_tokens, merge_token_rows, output_head, token_rows

__all__ = [
    "ALL_LINEAR", "ATTENTION_MODULES", "AdapterError", "LoRAConfig", "LoRALinear", "average_adapters", "count_parameters",
    "describe_token_rows", "export_merged", "inject_lora", "inject_trainable_tokens", "load_adapter",
    "lora_layers", "lora_parameter_count", "mark_only_lora_as_trainable", "merge_all", "merge_into_plain_linears", "merge_token_rows",
    "output_head", "parse_target_modules", "read_adapter_config", "save_adapter", "save_adapter_tensors", "token_rows",
    "trainable_report", "unmerge_all",
]

"""Export a merged model: the adapter folded into full-precision base weights, saved as a normal
Hugging Face model folder (with its tokenizer) that needs neither this toolkit nor PEFT.

    python -m lora.export ADAPTER_DIR OUT_DIR [--model embedded] [--dtype bfloat16]

For a QLoRA adapter (recorded by train.py, or `--nf4`) the base is quantized to NF4 exactly as in training, then dequantized,
and the update is added to those dequantized weights in float32: the adapter learned to correct
*that* base. The result is never re-quantized, which would round away much of what was learned.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from .adapter import AdapterError, load_adapter, trained_on_nf4
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
        _replace(model, name, merged.to(dtype))
    for name, module in list(model.named_modules()):
        if hasattr(module, "to_linear"):
            _replace(model, name, module.to_linear(dtype))


def export_merged(model: nn.Module, tokenizer, directory: str | Path, dtype: torch.dtype) -> None:
    """Merge and save to `directory`, which must not exist yet (nothing is overwritten)."""
    directory = Path(directory)
    if directory.exists():
        raise AdapterError(f"{directory} already exists; choose a new folder for the merged model")
    merge_into_plain_linears(model, dtype)
    model.config.dtype = dtype
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _plain_linear(base: nn.Module, dtype: torch.dtype) -> nn.Linear:
    if hasattr(base, "to_linear"):
        return base.to_linear(dtype)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=dtype)
    linear.load_state_dict({key: value.to(dtype) for key, value in base.state_dict().items()})
    return linear.requires_grad_(False)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def main(argv: list[str] | None = None) -> int:
    import models

    parser = argparse.ArgumentParser(prog="python -m lora.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter folder (ours or PEFT's)")
    parser.add_argument("out", help="new folder for the merged model")
    parser.add_argument("--model", default=models.EMBEDDED_MODEL, help="base model id or folder (default: %(default)s)")
    parser.add_argument("--nf4", action="store_true",
                        help="the adapter was trained on an NF4 base (automatic for adapters from make qlora)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the saved weights (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        nf4 = args.nf4 or trained_on_nf4(args.adapter)
        model = models.load_model(args.model, torch.device("cpu"), torch.float32, nf4=nf4)
        tokenizer = models.load_tokenizer(args.model)
        load_adapter(model, args.adapter)
        export_merged(model, tokenizer, args.out, getattr(torch, args.dtype))
    except (AdapterError, models.ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged model written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

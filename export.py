"""Export a merged model: the adapter folded into full-precision base weights, saved as a normal
Hugging Face model folder (with its tokenizer) that needs neither this toolkit nor PEFT.

    python export.py ADAPTER_DIR OUT_DIR [--model embedded] [--dtype bfloat16]

For a QLoRA adapter (recorded by train.py, or `--nf4`) the base is quantized to NF4 exactly as in
training, then dequantized, and the update is added in float32 (lora/merge.py). vLLM and llama.cpp
refuse adapters with trainable token rows; the merged folder is the way to serve one there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.files import FileError, check_new_folder
from gemma import loading
from gemma.loading import add_model_option
from lora import AdapterError, export_merged, load_adapter
from lora.adapter import trained_on_nf4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter folder (ours or PEFT's)")
    parser.add_argument("out", help="new folder for the merged model")
    add_model_option(parser)
    parser.add_argument("--nf4", action="store_true",
                        help="the adapter was trained on an NF4 base (automatic for adapters from make qlora)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the saved weights (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        check_new_folder(Path(args.out), "merged model")  # before the slow loading and merging
        nf4 = args.nf4 or trained_on_nf4(args.adapter)
        model = loading.load_model(args.model, torch.device("cpu"), torch.float32, nf4=nf4)
        tokenizer = loading.load_tokenizer(args.model)
        load_adapter(model, args.adapter)
        export_merged(model, tokenizer, args.out, getattr(torch, args.dtype))
    except (AdapterError, FileError, loading.ModelLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged model written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

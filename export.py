"""Export a merged model: the adapter folded into full-precision base weights, saved as a normal
Hugging Face model folder (with its tokenizer) or, with --gguf, as one GGUF file for llama.cpp,
Ollama and LM Studio, with an Ollama Modelfile beside it. Neither needs this toolkit nor PEFT.

    python export.py ADAPTER_DIR OUT_DIR [--model embedded] [--dtype bfloat16]
    python export.py ADAPTER_DIR OUT_DIR --gguf [--outtype f16|bf16|q8_0]

For a QLoRA adapter (recorded by train.py, or `--nf4`) the base is quantized to NF4 exactly as in
training, then dequantized, and the update is added in float32 (lora/merge.py). vLLM and llama.cpp
refuse adapters with trainable token rows; a merged model is the way to serve one there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.files import FileError, check_new_folder
from gemma import loading
from gemma.chat_format import CHAT_TEMPLATE
from gemma.loading import add_model_option
from gguf_export import OUTTYPES, GGUFExportError, write_gguf_folder
from gguf_export.hyperparameters import gguf_architecture
from gguf_export.vocabulary import sentencepiece_vocabulary
from lora import AdapterError, export_merged, load_adapter, merge_into_plain_linears, read_adapter_config
from lora.adapter import read_adapter_weights, trained_on_nf4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter folder (ours or PEFT's)")
    parser.add_argument("out", help="new folder for the merged model (nothing existing is overwritten)")
    add_model_option(parser)
    parser.add_argument("--nf4", action="store_true",
                        help="the adapter was trained on an NF4 base (automatic for adapters from make qlora)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the saved weights of a Hugging Face folder (default: %(default)s)")
    parser.add_argument("--gguf", action="store_true",
                        help="write OUT/model-OUTTYPE.gguf and OUT/Modelfile instead of a Hugging Face folder")
    parser.add_argument("--outtype", choices=list(OUTTYPES),
                        help="GGUF weight type: f16 (default), bf16, or q8_0 (8-bit, about half the size)")
    args = parser.parse_args(argv)
    if args.outtype and not args.gguf:
        parser.error("--outtype applies to --gguf only (use --dtype for a Hugging Face folder)")
    args.outtype = args.outtype or "f16"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Everything that can be refused is refused before the slow loading and merging.
        check_new_folder(Path(args.out), "merged model")
        read_adapter_config(args.adapter)
        read_adapter_weights(args.adapter)  # a damaged file is found before the model is loaded
        nf4 = args.nf4 or trained_on_nf4(args.adapter)
        tokenizer = loading.load_tokenizer(args.model)
        if args.gguf:
            sentencepiece_vocabulary(tokenizer)
            gguf_architecture(loading.load_config(args.model))
        model = loading.load_model(args.model, torch.device("cpu"), torch.float32, nf4=nf4)
        load_adapter(model, args.adapter)
        if args.gguf:
            merge_into_plain_linears(model, torch.float32)
            written = write_gguf_folder(model, tokenizer, Path(args.out), args.outtype, Path(args.adapter).name)
        else:
            tokenizer.chat_template = CHAT_TEMPLATE  # so apply_chat_template speaks the format it was trained on
            export_merged(model, tokenizer, args.out, getattr(torch, args.dtype))
            written = Path(args.out)
    except (AdapterError, FileError, GGUFExportError, loading.ModelLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged model written to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

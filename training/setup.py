"""The model a run trains: the base (NF4-quantized for QLoRA) with LoRA and the trainable embedding rows
injected (`--trainable-tokens` picks the rows), after checking that the adapter's training state fits in
the device's memory, with the options that change speed and memory but not the result (compile,
gradient checkpointing).
"""

from __future__ import annotations

import torch

from common import hardware
from gemma.chat_format import TURN_MARKERS
from gemma.loading import load_model
from lora import LoRAConfig, inject_lora, inject_trainable_tokens, lora_parameter_count
from training.config import TrainConfig


class TrainError(RuntimeError):
    """A run cannot start or resume; the message is one line meant for the user."""


def apply_speed_options(model: torch.nn.Module, compile_layers: bool, checkpoint_layers: bool) -> None:
    """Options that change speed and memory, not what is computed (up to float rounding).

    checkpoint_layers: keep only each decoder layer's input and recompute the rest in the backward pass
    (non-reentrant, so the frozen embedding's output needs no requires_grad).
    compile_layers: torch.compile each decoder layer, LoRA inside it, in place; the loss, embedding and
    head stay eager. It fuses the elementwise work around the matmuls (norms, casts, GeGLU, LoRA's
    scaling), which dominates an eager step on a GPU. The LoRA dropout's masks are drawn by the eager
    operator (inductor's `fallback_random`): inductor's own generator draws other masks from the same
    seed, so a compiled run would train another model than an eager one, and a run resumed with the
    other setting, or a layer that dynamo leaves eager after too many recompilations, would mix the two."""
    if checkpoint_layers:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if compile_layers:
        for layer in model.model.layers:  # the option applies to these layers only, not to the whole process
            layer.compile(options={"fallback_random": True})


def compiles_layers(config: TrainConfig, device: torch.device) -> bool:
    """--compile as asked; by default on CUDA only (on the CPU `make bench` shows no reliable gain)."""
    return config.compile if config.compile is not None else device.type == "cuda"


# Bytes per trainable number: the float32 weight, its gradient and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 4 * 4


def check_adapter_fits(model: torch.nn.Module, lora: LoRAConfig, device: torch.device) -> None:
    """Refuse, before allocating anything, an adapter whose weights, gradients and optimizer state
    alone would not fit in the memory the device has free (activations come on top)."""
    needed = lora_parameter_count(model, lora) * TRAINING_BYTES_PER_PARAMETER
    free = hardware.free_memory_bytes(device)
    if free is not None and needed > free:
        raise TrainError(f"--rank {lora.rank}: the adapter's weights, gradients and AdamW state need "
                         f"{needed / 2**30:.1f} GiB, but {device} has {free / 2**30:.1f} GiB free; use a smaller rank")


def resolve_trainable_tokens(spec: str, tokenizer) -> tuple[int, ...]:
    """`--trainable-tokens` -> token ids: "none", "auto" (the turn markers, when the tokenizer has
    them), or a comma-separated list of token strings and ids."""
    spec = spec.strip()
    if spec == "none":
        return ()
    # `auto`: the chat markers every training example uses, whose rows pretrained (not
    # instruction-tuned) Gemma checkpoints never trained.
    names = TURN_MARKERS if spec == "auto" else [item.strip() for item in spec.split(",") if item.strip()]
    ids = []
    for name in names:
        token_id = int(name) if name.isdigit() else tokenizer.convert_tokens_to_ids(name)
        if not isinstance(token_id, int) or (not name.isdigit() and token_id == tokenizer.unk_token_id):
            if spec == "auto":
                return ()  # a tokenizer without Gemma's turn markers: nothing to train
            raise TrainError(f"--trainable-tokens: {name!r} is not a single token of this tokenizer")
        if not 0 <= token_id < len(tokenizer):
            raise TrainError(f"--trainable-tokens: id {token_id} is outside the vocabulary (size {len(tokenizer)})")
        ids.append(token_id)
    if len(set(ids)) != len(ids):
        raise TrainError(f"--trainable-tokens names a token twice: {spec}")
    return tuple(ids)


def prepare_model(config: TrainConfig, lora: LoRAConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base model (NF4-quantized for QLoRA) with `lora`'s LoRA layers and trainable token rows injected."""
    model = load_model(config.model, device, dtype, nf4=config.qlora)
    check_adapter_fits(model, lora, device)
    inject_lora(model, lora)
    if lora.trainable_token_indices:
        inject_trainable_tokens(model, lora.trainable_token_indices)
    apply_speed_options(model, compile_layers=compiles_layers(config, device),
                        checkpoint_layers=config.gradient_checkpointing)
    return model

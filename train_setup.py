"""What train.py does to a model before training it, apart from injecting LoRA: pick the embedding rows
to train (`--trainable-tokens`), check that the adapter's training state fits in the device's memory,
and apply the options that change speed and memory but not the result (compile, gradient checkpointing).
"""

from __future__ import annotations

import torch

import models
from chat_format import TURN_MARKERS
from lora import LoRAConfig, lora_parameter_count


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
        from torch._inductor import config as inductor_config  # torch.compile loads it anyway; not before

        inductor_config.fallback_random = True
        for layer in model.model.layers:
            layer.compile()


# Bytes per trainable number: the float32 weight, its gradient and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 4 * 4


def check_adapter_fits(model: torch.nn.Module, lora: LoRAConfig, device: torch.device) -> None:
    """Refuse, before allocating anything, an adapter whose weights, gradients and optimizer state
    alone would not fit in the memory the device has free (activations come on top)."""
    needed = lora_parameter_count(model, lora) * TRAINING_BYTES_PER_PARAMETER
    free = models.free_memory_bytes(device)
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

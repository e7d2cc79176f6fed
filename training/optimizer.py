"""AdamW over the trainable tensors and its learning rate: linear warmup, then cosine decay to zero."""

from __future__ import annotations

import math

import torch

from lora import token_rows


def make_optimizer(model, config):
    """(trainable parameters, AdamW over them); `config` is a TrainConfig (lr, weight_decay, token_lr_scale).
    No loss scaler: the compute dtype is bf16 or float32 (common/hardware.py), never float16.

    LoRA matrices and trainable token rows are separate groups, each with an `lr_scale` that the
    schedule's rate is multiplied by. Token rows get no weight decay: they are whole rows, not
    differences, and decay would pull them towards zero rather than towards the base model's row.
    """
    found = token_rows(model)
    rows = [found[1].trainable_tokens_delta] if found else []
    lora = [p for p in model.parameters() if p.requires_grad and not any(p is row for row in rows)]
    groups = [{"params": lora, "weight_decay": config.weight_decay, "lr_scale": 1.0}]
    if rows:
        groups.append({"params": rows, "weight_decay": 0.0, "lr_scale": config.token_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    return lora + rows, optimizer


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def learning_rate(step: int, max_lr: float, warmup: int, total: int) -> float:
    """Linear warmup to max_lr over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


STUDY_WARMUP_STEPS = 150


def warmup_for(total_steps: int, requested: int | None) -> int:
    """Warmup steps: as requested, or (None) 5% of the run, at most the study's 150 (which were 5% of its
    run). Raises ValueError for a request longer than the run: its learning rate would never peak."""
    if requested is None:
        return max(1, min(STUDY_WARMUP_STEPS, math.ceil(0.05 * total_steps)))
    if requested > total_steps:
        raise ValueError(f"--warmup-steps {requested} is longer than the run ({total_steps} optimizer steps): "
                         "its learning rate would never reach --lr")
    return requested

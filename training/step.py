"""One optimizer step of train.py's loop, and the held-out loss: mixed precision, the loss averaged per
supervised token over the whole accumulation window (and over all ranks under torchrun), optionally plus
the pseudo-repetition loss of a looping batch (training/repetition.py), AdamW with its parameter groups, clipping."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from data.dataset import IGNORE_INDEX
from training.distributed import SINGLE_PROCESS, World, sum_gradients, sum_over_ranks
from training.loss import count_supervised, decoder_hidden, supervised_loss_sum, target_log_probabilities
from training.repetition import repetition_loss_sum


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in `dtype`; float32 means none (autocast has no float32 mode)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def accumulate_gradients(model, batches: list[dict], device: torch.device, dtype: torch.dtype,
                         world: World = SINGLE_PROCESS, unlikelihood: float = 0.0) -> tuple[float, int]:
    """Backward over this rank's micro-batches of one optimizer step; returns (window loss, supervised
    tokens), both over the whole window (all ranks).

    The loss is averaged per supervised token over the whole window, which makes batch 4 x
    accumulation 4 the same gradient as batch 16 x 1 (a mean of per-micro-batch means would not be),
    and N ranks the same as one (training/distributed.py). `unlikelihood` > 0 adds that weight x the token-level
    unlikelihood term (training/loss.py) to the loss, averaged the same way.
    """
    local_tokens = sum(count_supervised(batch) for batch in batches)
    window_tokens = int(sum_over_ranks(world, [local_tokens])[0])
    loss_value = 0.0
    for batch in batches:
        batch = on_device(batch, device)
        with autocast(device, dtype):
            loss = supervised_loss_sum(model, batch, unlikelihood) / window_tokens
        loss.backward()
        loss_value += loss.item()
    return sum_over_ranks(world, [loss_value])[0], window_tokens


def accumulate_repetition_gradients(model, batch: dict | None, weight: float, device: torch.device,
                                    dtype: torch.dtype, world: World = SINGLE_PROCESS) -> float | None:
    """Backward of `weight` x the looping batch's DITTO loss averaged per penalized token (over all ranks);
    returns that mean loss (unweighted), None when no rank had a looping row.

    Every rank takes part in the sums, with or without rows of its own: a rank that skipped them would
    leave the others waiting in the collective for ever."""
    loss_sum, tokens = torch.zeros(()), 0
    if batch is not None:
        batch = on_device(batch, device)
        with autocast(device, dtype):
            loss_sum, tokens = repetition_loss_sum(model, batch)
    total_tokens = int(sum_over_ranks(world, [tokens])[0])
    if batch is not None and total_tokens:
        (weight * loss_sum / total_tokens).backward()
    total_loss = sum_over_ranks(world, [loss_sum.item()])[0]
    return total_loss / total_tokens if total_tokens else None


def optimizer_step(model, parameters: list, optimizer, batches: list[dict], device: torch.device,
                   dtype: torch.dtype, grad_clip: float, world: World = SINGLE_PROCESS,
                   unlikelihood: float = 0.0, looping: dict | None = None,
                   repetition: float = 0.0) -> tuple[float, int, float, float | None]:
    """One optimizer step over its micro-batches, plus (when `repetition` > 0) `repetition` x the DITTO loss
    of this rank's `looping` rows, which may be None; returns (loss, supervised tokens, gradient norm, DITTO
    loss or None). train.py's loop runs its two halves itself, the update with interrupts held."""
    result = step_gradients(model, parameters, batches, device, dtype, grad_clip, world, unlikelihood, looping,
                            repetition)
    apply_update(optimizer)
    return result


def step_gradients(model, parameters: list, batches: list[dict], device: torch.device,
                   dtype: torch.dtype, grad_clip: float, world: World = SINGLE_PROCESS,
                   unlikelihood: float = 0.0, looping: dict | None = None,
                   repetition: float = 0.0) -> tuple[float, int, float, float | None]:
    """The first half of optimizer_step: the window's clipped gradient, summed over ranks; nothing is
    updated yet, so an interrupt here loses only this window's work."""
    loss, tokens = accumulate_gradients(model, batches, device, dtype, world, unlikelihood)
    repetition_loss = (accumulate_repetition_gradients(model, looping, repetition, device, dtype, world)
                       if repetition else None)
    sum_gradients(world, parameters)  # every rank now holds the whole window's gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip).item()
    return loss, tokens, grad_norm, repetition_loss


def apply_update(optimizer) -> None:
    """The second half: AdamW's update, gradients cleared."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (or a `kill`, which train.py turns into one) that arrives inside is raised at the end instead.

    The optimizer's update and the loop's count of completed steps must change together: an interrupt
    between the two would checkpoint updated weights and AdamW moments under the previous step, and the
    resumed run would apply that step twice. Only the main thread can handle signals; elsewhere (a
    benchmark's worker thread) nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number, handler in held.items():
        if handler is signal.default_int_handler:
            signal.signal(number, lambda received, frame: arrived.append(received))
    try:
        yield
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)
    if arrived:
        raise KeyboardInterrupt


def held_out_losses(model, batches: list[dict], device: torch.device, dtype: torch.dtype,
                    world: World = SINGLE_PROCESS) -> dict[str, float]:
    """Mean loss per supervised token, and the mean loss of each row's last label alone (the closing
    `<end_of_turn>`: whether the model knows where its answer ends). Each rank takes its share of
    the batches; the sums are added up across ranks, so every row counts once."""
    model.eval()
    loss = end_loss = tokens = rows = 0.0
    with torch.no_grad(), autocast(device, dtype):
        for batch in batches[world.rank::world.size]:
            batch = on_device(batch, device)
            hidden = decoder_hidden(model, batch)
            targets = batch["labels"][:, 1:]
            supervised = targets != IGNORE_INDEX
            last = supervised & ~torch.nn.functional.pad(supervised[:, 1:], (0, 1))
            token_losses = -target_log_probabilities(model, hidden[:, :-1][supervised], targets[supervised])
            loss += token_losses.sum().item()
            end_loss += token_losses[last[supervised]].sum().item()
            tokens += int(supervised.sum())
            rows += int(last.sum())
    model.train()
    loss, end_loss, tokens, rows = sum_over_ranks(world, [loss, end_loss, tokens, rows])
    return {"held_out_loss": loss / max(tokens, 1), "held_out_end_loss": end_loss / max(rows, 1)}

"""The training run, top to bottom: set up the data, model and optimizer (or resume them from a
checkpoint), then for each optimizer step accumulate micro-batches, clip, step AdamW on the warmup +
cosine schedule, log, evaluate the held-out loss and checkpoint every so often, and at the end save the
adapter and the run's summary."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import hardware
from data.dataset import batch_order, collate, encode_rows, load_rows, split_rows
from gemma import loading
from lora import LoRAConfig, describe_token_rows, save_adapter, trainable_report
from training import distributed
from training.checkpoint import data_fingerprint, hold_output_folder, rng_state, save_checkpoint, start_or_resume
from training.config import TrainConfig, resolve_defaults
from training.distributed import (
    RankFailed, World, all_or_none, gather, my_rows, my_share, same_start, sum_over_ranks,
)
from training.optimizer import learning_rate, make_optimizer, set_learning_rate, warmup_for
from training.repetition import looping_batch, newline_token_ids
from training.reporting import reporting
from training.run_log import (
    SUMMARY_NAME, peak_memory_bytes, plot_losses, record, summarize, truncate_metrics, write_settings,
)
from training.setup import TrainError, compiles_layers, prepare_model, resolve_trainable_tokens
from training.step import apply_update, held_out_losses, interrupts_held, step_gradients


def schedule_micro_batches(lengths: list[int], config: TrainConfig) -> list[list[int]]:
    """Every micro-batch of every epoch, in training order (deterministic in the seed)."""
    return [batch for epoch in range(config.epochs)
            for batch in batch_order(lengths, config.batch_size, config.seed, epoch)]


def run(config: TrainConfig, after_step: Callable[[int], None] | None = None) -> dict | None:
    """Train (or resume) as `config` says; returns the summary (None on ranks other than 0 under
    torchrun). `after_step(step)` is called after each optimizer step (benchmarks time steps with it;
    tests kill the process with it)."""
    world = distributed.start(config.device)
    device = world.device
    try:
        config = resolve_defaults(config)
        with ExitStack() as held:
            with all_or_none(world, "start"):  # a rank that cannot start stops the others at once
                if world.is_main:
                    held.enter_context(hold_output_folder(Path(config.out)))
                training = _setup(config, device, world)  # no collectives in here: a failed rank votes instead
            same_start(world, training.parameters)
            report = held.enter_context(reporting(config.report_to if world.is_main else "none", Path(config.out),
                                                  training.start_step))
            return _train(training, after_step, report)
    finally:
        distributed.finish(world)


@dataclass
class Training:
    """Everything the loop needs, as _setup prepared it."""

    config: TrainConfig
    device: torch.device
    dtype: torch.dtype
    world: World
    pad_id: int
    newline_ids: frozenset[int]  # where lines end, for the looping batches (empty unless --repetition)
    examples: list[dict]
    windows: list[list[list[int]]]  # per optimizer step, this rank's micro-batches (example indices)
    step_rows: list[list[int]]  # per optimizer step, every rank's examples (what the looping rows are drawn from)
    total_steps: int
    warmup: int
    eval_batches: list[dict]
    dropped: int
    fingerprint: str
    settings: dict  # what the checkpoints record (run_settings)
    model: torch.nn.Module
    lora: LoRAConfig
    parameters: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    start_step: int
    started: float


def _setup(config: TrainConfig, device: torch.device, world: World) -> Training:
    started = time.time()
    dtype = hardware.pick_compute_dtype(device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    tokenizer = loading.load_tokenizer(config.model)
    examples, held_out, dropped = _setup_data(config, tokenizer, world)
    # The schedule is the single-process one at the global batch size (world x --batch-size); each
    # rank takes its slice of every micro-batch, so N ranks see exactly the rows one process would.
    schedule = schedule_micro_batches([len(e["input_ids"]) for e in examples],
                                      dataclasses.replace(config, batch_size=config.batch_size * world.size))
    windows = [[rows for micro in schedule[i:i + config.grad_accum]
                if (rows := my_rows(world, micro, config.batch_size))]
               for i in range(0, len(schedule), config.grad_accum)]
    step_rows = [[row for micro in schedule[i:i + config.grad_accum] for row in micro]
                 for i in range(0, len(schedule), config.grad_accum)]
    total_steps = min(len(windows), config.max_steps or len(windows))
    config = with_schedule(config, total_steps)
    try:
        warmup = warmup_for(config.schedule_steps, config.warmup_steps)
    except ValueError as error:
        raise TrainError(str(error)) from None
    eval_batches = [collate(held_out[i:i + config.batch_size], tokenizer.pad_token_id)
                    for i in range(0, len(held_out), config.batch_size)]

    token_ids = resolve_trainable_tokens(config.trainable_tokens, tokenizer)
    lora = config.lora_config(token_ids)
    model = prepare_model(config, lora, device, dtype)
    if world.is_main:
        print(hardware.describe_compute(device, dtype))
        steps = (total_steps if total_steps == config.schedule_steps
                 else f"the first {total_steps} of {config.schedule_steps}")
        print(f"schedule: {steps} optimizer steps, warmup {warmup} "
              + ("(--warmup-steps, as asked)" if config.warmup_steps is not None else "(5% of the run, at most 150)"))
        if token_ids:
            print(describe_token_rows(model, tokenizer, token_ids))
        print(trainable_report(model))
    parameters, optimizer = make_optimizer(model, config)
    fingerprint = data_fingerprint(examples, schedule)
    settings = run_settings(config, world)
    start_step = start_or_resume(Path(config.out), settings, fingerprint, model, optimizer,
                                 config.overwrite, world.rank)
    newline_ids = newline_token_ids(tokenizer) if config.repetition else frozenset()
    return Training(
        config=config, device=device, dtype=dtype, world=world, pad_id=tokenizer.pad_token_id, newline_ids=newline_ids,
        examples=examples, windows=windows, step_rows=step_rows, total_steps=total_steps,
        warmup=warmup, eval_batches=eval_batches, dropped=dropped,
        fingerprint=fingerprint, settings=settings, model=model, lora=lora, parameters=parameters,
        optimizer=optimizer, start_step=start_step, started=started,
    )


def with_schedule(config: TrainConfig, total_steps: int) -> TrainConfig:
    """`config` with the length of its learning-rate schedule set: the run's `total_steps` unless
    --schedule-steps asks for more."""
    if config.schedule_steps is None:
        return dataclasses.replace(config, schedule_steps=total_steps)
    if config.schedule_steps < total_steps:
        raise TrainError(f"--schedule-steps {config.schedule_steps} is shorter than the run ({total_steps} optimizer "
                         "steps): its learning rate would reach zero before the end")
    return config


def _setup_data(config: TrainConfig, tokenizer, world: World) -> tuple[list[dict], list[dict], int]:
    """(training examples, held-out examples for the loss, training rows dropped as too long)."""
    train_rows, test_rows = split_rows(load_rows(config.dataset))
    examples, dropped = encode_rows(tokenizer, train_rows, config.max_length)
    held_out, _ = encode_rows(tokenizer, test_rows.select(range(min(config.eval_rows, len(test_rows)))),
                              config.max_length)
    if not examples:
        raise TrainError(f"no training row fits --max-length {config.max_length}")
    if world.is_main:
        print(f"data: {len(examples):,} training rows ({dropped:,} longer than {config.max_length} tokens dropped), "
              f"{len(held_out)} held-out rows for the loss")
        if not held_out:
            print(f"no held-out row ({len(test_rows)} in the split, none of up to {config.max_length} tokens): "
                  "the held-out loss is not measured")
    return examples, held_out, dropped


def run_settings(config: TrainConfig, world: World) -> dict:
    """The settings a checkpoint records and a resume must match: the config and the process count."""
    return {**dataclasses.asdict(config), "world_size": world.size}


def _looping_rows(training: Training, step: int) -> dict | None:
    """The step's looping rows, drawn alike on every rank from the whole window (all ranks' examples), so
    N processes train on the rows one process would; each rank then takes its share (my_share)."""
    config = training.config
    window = [training.examples[index] for index in training.step_rows[step]]
    # One seed for every rank (rank 0's), so that every rank draws the same rows.
    return looping_batch(window, training.newline_ids, config.max_length, config.repetition_rows,
                         f"{config.seed}:{step}:0", training.pad_id, config.repetition_from_copy)


def _train(training: Training, after_step: Callable[[int], None] | None,
           report: Callable[[dict], None]) -> dict | None:
    config, model, world = training.config, training.model, training.world
    device, dtype, optimizer = training.device, training.dtype, training.optimizer
    out = Path(config.out)
    metrics_path = out / "metrics.jsonl"
    settings = training.settings
    history = []
    if world.is_main:
        if training.start_step == 0:
            metrics_path.unlink(missing_ok=True)
            write_settings(out, settings)
        else:
            history = truncate_metrics(metrics_path, training.start_step)  # without lines written after the checkpoint

    def log(entry: dict) -> None:
        record(metrics_path, history, entry)
        report(entry)

    # A resumed run's wall time adds this part of the run to the earlier parts (up to their last checkpoint).
    earlier_s = max((entry.get("wall_s", 0.0) for entry in history), default=0.0)
    model.train()

    def record_held_out(step: int) -> None:
        if not training.eval_batches:  # no held-out row (said at the start): nothing to measure, never a 0.0
            return
        losses = held_out_losses(model, training.eval_batches, device, dtype, world)
        if world.is_main:
            log({"step": step, **losses})

    if training.start_step == 0:
        record_held_out(0)

    def save(step: int, rng: list[dict]) -> None:
        if world.is_main:
            save_checkpoint(out, step, model, optimizer, rng, settings, training.lora,
                            training.fingerprint)

    completed, rng_after_completed = training.start_step, gather(world, rng_state())
    progress = tqdm(total=training.total_steps, initial=training.start_step, desc="train", unit="step",
                    dynamic_ncols=True, disable=not world.is_main)
    try:
        for step in range(training.start_step, training.total_steps):
            step_started = time.time()
            lr = learning_rate(step, config.lr, training.warmup, config.schedule_steps)
            set_learning_rate(optimizer, lr)
            window = [[training.examples[i] for i in micro] for micro in training.windows[step]]
            batches = [collate(examples, training.pad_id) for examples in window]
            looping = my_share(world, _looping_rows(training, step)) if config.repetition else None
            loss_value, window_tokens, grad_norm, repetition_loss = step_gradients(
                model, training.parameters, batches, device, dtype, config.grad_clip,
                world, config.unlikelihood, looping, config.repetition)
            with interrupts_held():  # the update and the count of completed steps: both or neither
                apply_update(optimizer)
                # Every rank's random state after this step, held by all: Ctrl-C can then save without
                # waiting for the other ranks.
                completed, rng_after_completed = step + 1, gather(world, rng_state())

            seconds = time.time() - step_started
            local_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
            tokens = int(sum_over_ranks(world, [local_tokens])[0])
            if world.is_main:
                log({
                    "step": completed, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                    "supervised_tokens": window_tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                    "peak_memory_gb": peak_memory_bytes(device) / 1e9,
                    "wall_s": earlier_s + time.time() - training.started,
                    **({"repetition_loss": repetition_loss} if repetition_loss is not None else {})})
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            progress.update(1)
            if completed % config.eval_every == 0 or completed == training.total_steps:
                record_held_out(completed)
            if completed % config.save_every == 0 or completed == training.total_steps:
                save(completed, rng_after_completed)
            if after_step is not None:
                after_step(completed)
    except KeyboardInterrupt:
        progress.close()
        # An interrupted window's gradients are discarded: the checkpoint holds the state after the
        # last completed step, with the random states as they were then.
        optimizer.zero_grad(set_to_none=True)
        save(completed, rng_after_completed)
        if not world.is_main:
            raise RankFailed(f"rank {world.rank}: interrupted") from None
        raise TrainError(f"interrupted: checkpoint at step {completed} saved in {out}; run again to resume") from None
    progress.close()
    if not world.is_main:
        return None
    save_adapter(model, out, training.lora)
    plot_losses(history, out / "training_loss.png")
    wall_s = earlier_s + time.time() - training.started
    summary = summarize(model, history, wall_s, peak_memory_bytes(device), training.dropped,
                        {"epochs": config.epochs, "max_length": config.max_length, "qlora": config.qlora,
                         "processes": world.size, "compute_dtype": hardware.dtype_name(dtype),
                         "compiled_layers": compiles_layers(config, device),
                         "warmup_steps": training.warmup})
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary

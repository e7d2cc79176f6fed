"""Fine-tune a Gemma model with LoRA or QLoRA in one plain PyTorch loop (no Trainer, no PEFT).

    python train.py                          # LoRA r=16 on the embedded Gemma 3 270M and corpus
    python train.py --qlora                  # the same on an NF4-quantized base
    python train.py --model google/gemma-2-2b \\
        --dataset iamtarun/python_code_instructions_18k_alpaca   # the study's full run

The loop, top to bottom: load the model (and quantize it for QLoRA), inject LoRA into q/k/v/o,
tokenize the data, then for each optimizer step accumulate micro-batches with the loss averaged
per supervised token over the whole window, clip, step AdamW with the warmup + cosine learning
rate, and every --save-every steps write a checkpoint that resumes bit for bit. Starting again with
the same output folder resumes; Ctrl-C saves a checkpoint and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
import models
from checkpoint import (
    CheckpointError, data_fingerprint, hold_output_folder, rng_state, save_checkpoint, start_or_resume,
)
from data.dataset import DataError, batch_order, collate, encode_rows, load_rows, split_rows
from distributed import RankFailed, World, all_or_none, gather, my_rows, same_start, sum_over_ranks
from lora import (
    ATTENTION_MODULES, AdapterError, LoRAConfig, describe_token_rows, inject_lora, inject_trainable_tokens,
    parse_target_modules, save_adapter, trainable_report,
)
from options import COUNT, DEVICE, DROPOUT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SEED, ranged
from repetition import looping_batch, newline_token_ids
from train_setup import TrainError, apply_speed_options, check_adapter_fits, resolve_trainable_tokens
from train_step import held_out_losses, make_optimizer, optimizer_step, set_learning_rate
from training_log import (
    SUMMARY_NAME, peak_memory_bytes, plot_losses, record, summarize, summary_line, truncate_metrics, write_settings,
)

@dataclass(frozen=True)
class Recipe:
    """The settings that depend on where a run trains (filled in where TrainConfig leaves them None)."""
    epochs: int
    max_length: int  # longer rows are dropped
    lr: float  # peak learning rate of the LoRA matrices
    token_lr_scale: float  # the token rows' learning rate = this x lr
    repetition: float  # weight of the pseudo-repetition (DITTO) loss; 0 = off


# The study's: 3 epochs at length 768, lr 2.5e-4; the token rows at 10x (chosen by measurement: README).
STUDY = Recipe(epochs=3, max_length=768, lr=2.5e-4, token_lr_scale=10.0, repetition=0.0)
# On this 2-core CPU the study's recipe on the embedded corpus would take hours. The embedded default
# trains 2 epochs on the rows of up to 256 tokens (44m33s on a slow 2-core CPU), at 4x the study's learning rate
# (its 164 steps are 5% of the study's 3,375), the token rows kept at 2.5e-3: each change measured better on every
# rate (README: "Training on the embedded defaults"). Pseudo-repetition training from the third copy removed the
# loops (syntax 92.7% -> 98.2%, paired p = 0.012), one looping row per step as good (98.6%; README: "DITTO").
EMBEDDED_CPU = Recipe(epochs=2, max_length=256, lr=1e-3, token_lr_scale=2.5, repetition=1.0)


@dataclass
class TrainConfig:
    model: str = models.EMBEDDED_MODEL
    dataset: str = "default"
    out: str = "outputs/lora_r16"
    rank: int = LoRAConfig.rank
    alpha: float | None = None  # None: 2 * rank, as in the study's rank sweep
    dropout: float = LoRAConfig.dropout
    targets: str = ",".join(ATTENTION_MODULES)
    rslora: bool = False
    trainable_tokens: str = "auto"  # "auto" (the turn markers), "none", or token strings / ids, comma-separated
    token_lr_scale: float | None = None  # the token rows' learning rate = this x lr; None: the recipe's
    qlora: bool = False
    compile: bool | None = None  # compile each decoder layer; None: on CUDA only (on the CPU it measured no clear win)
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass
    batch_size: int = 4
    grad_accum: int = 4
    lr: float | None = None  # None: the recipe's (STUDY, or EMBEDDED_CPU for the embedded default on a CPU)
    weight_decay: float = 0.01
    warmup_steps: int = 150
    epochs: int | None = None  # None: the recipe's
    max_steps: int | None = None
    max_length: int | None = None  # None: the recipe's
    grad_clip: float = 1.0
    unlikelihood: float = 0.0  # weight of the token-level unlikelihood term against repeating the answer's tokens
    repetition: float | None = None  # weight of the DITTO loss of one looping batch per step (repetition.py); None: the recipe's
    repetition_from_copy: int = 3  # the first copy of a looping block that the DITTO loss applies to (the paper's: 2)
    repetition_rows: int = 1  # looping rows per optimizer step (and process); each is --max-length tokens long
    seed: int = 42
    save_every: int = 25  # a checkpoint is small (adapter + AdamW state): a killed run loses little
    eval_every: int = 100  # each held-out pass costs about 1.5 optimizer steps on the CPU
    eval_rows: int = 64
    device: str | None = None
    overwrite: bool = False

    def lora_config(self, token_ids: tuple[int, ...] = ()) -> LoRAConfig:
        base_name = "google/gemma-3-270m" if self.model == models.EMBEDDED_MODEL else self.model
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=parse_target_modules(self.targets), use_rslora=self.rslora,
                          base_model_name_or_path=base_name, trainable_token_indices=token_ids)


def resolve_defaults(config: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill the settings left to their defaults (alpha, compile, and the recipe's)."""
    embedded_on_cpu = config.model == models.EMBEDDED_MODEL and config.dataset == "default" and device.type == "cpu"
    recipe = EMBEDDED_CPU if embedded_on_cpu else STUDY
    return dataclasses.replace(
        config,
        alpha=config.alpha if config.alpha is not None else 2.0 * config.rank,
        compile=config.compile if config.compile is not None else device.type == "cuda",
        **{field.name: getattr(recipe, field.name) for field in dataclasses.fields(Recipe)
           if getattr(config, field.name) is None},
    )


def recipe_default(field: str) -> str:
    """The --help text of a setting the recipe fills: both recipes' values."""
    return f"default: {getattr(STUDY, field):g}; {getattr(EMBEDDED_CPU, field):g} for the embedded defaults on a CPU"


def learning_rate(step: int, max_lr: float, warmup: int, total: int) -> float:
    """Linear warmup to max_lr over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_for(total_steps: int, requested: int) -> int:
    """The study's 150 warmup steps were 5% of its run; shorter runs warm up for 5% of theirs."""
    return max(1, min(requested, math.ceil(0.05 * total_steps)))


# ----------------------------------------------------------------------------------- the run

def schedule_micro_batches(lengths: list[int], config: TrainConfig) -> list[list[int]]:
    """Every micro-batch of every epoch, in training order (deterministic in the seed)."""
    return [batch for epoch in range(config.epochs)
            for batch in batch_order(lengths, config.batch_size, config.seed, epoch)]


def prepare_model(config: TrainConfig, device: torch.device, dtype: torch.dtype,
                  token_ids: tuple[int, ...] = ()) -> torch.nn.Module:
    """The base model (NF4-quantized for QLoRA) with LoRA and the trainable token rows injected."""
    model = models.load_model(config.model, device, dtype, nf4=config.qlora)
    lora = config.lora_config(token_ids)
    check_adapter_fits(model, lora, device)
    inject_lora(model, lora)
    if token_ids:
        inject_trainable_tokens(model, token_ids)
    apply_speed_options(model, compile_layers=config.compile, checkpoint_layers=config.gradient_checkpointing)
    return model


def run(config: TrainConfig, after_step: Callable[[int], None] | None = None) -> dict | None:
    """Train (or resume) as `config` says; returns the summary (None on ranks other than 0 under
    torchrun). `after_step(step)` is called after each optimizer step (benchmarks time steps with it;
    tests kill the process with it)."""
    world = distributed.start(config.device)
    device = world.device
    try:
        config = resolve_defaults(config, device)
        with ExitStack() as held:
            with all_or_none(world, "start"):  # a rank that cannot start stops the others at once
                if world.is_main:
                    held.enter_context(hold_output_folder(Path(config.out)))
                training = _setup(config, device, world)  # no collectives in here: a failed rank votes instead
            same_start(world, training.parameters)
            return _train(training, after_step)
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
    scaler: torch.amp.GradScaler
    start_step: int
    started: float


def _setup(config: TrainConfig, device: torch.device, world: World) -> Training:
    started = time.time()
    dtype = models.pick_compute_dtype(device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    tokenizer = models.load_tokenizer(config.model)
    examples, held_out, dropped = _setup_data(config, tokenizer, world)
    # The schedule is the single-process one at the global batch size (world x --batch-size); each
    # rank takes its slice of every micro-batch, so N ranks see exactly the rows one process would.
    schedule = schedule_micro_batches([len(e["input_ids"]) for e in examples],
                                      dataclasses.replace(config, batch_size=config.batch_size * world.size))
    windows = [[rows for micro in schedule[i:i + config.grad_accum] if (rows := my_rows(world, micro, config.batch_size))]
               for i in range(0, len(schedule), config.grad_accum)]
    total_steps = min(len(windows), config.max_steps or len(windows))
    eval_batches = [collate(held_out[i:i + config.batch_size], tokenizer.pad_token_id)
                    for i in range(0, len(held_out), config.batch_size)]

    token_ids = resolve_trainable_tokens(config.trainable_tokens, tokenizer)
    model = prepare_model(config, device, dtype, token_ids)
    if world.is_main:
        print(models.describe_compute(device, dtype))
        if token_ids:
            print(describe_token_rows(model, tokenizer, token_ids))
        print(trainable_report(model))
    parameters, optimizer, scaler = make_optimizer(model, config, device, dtype)
    fingerprint = data_fingerprint(examples, schedule)
    settings = run_settings(config, world)
    start_step = start_or_resume(Path(config.out), settings, fingerprint, model, optimizer, scaler,
                                 config.overwrite, world.rank)
    newline_ids = newline_token_ids(tokenizer) if config.repetition else frozenset()
    return Training(config, device, dtype, world, tokenizer.pad_token_id, newline_ids, examples, windows, total_steps,
                    warmup_for(total_steps, config.warmup_steps), eval_batches, dropped, fingerprint, settings, model,
                    config.lora_config(token_ids), parameters, optimizer, scaler, start_step, started)


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


def _train(run: Training, after_step: Callable[[int], None] | None) -> dict | None:
    config, model, world, device, dtype = run.config, run.model, run.world, run.device, run.dtype
    out = Path(config.out)
    metrics_path = out / "metrics.jsonl"
    settings = run.settings
    history = []
    if world.is_main:
        if run.start_step == 0:
            metrics_path.unlink(missing_ok=True)
            write_settings(out, settings)
        else:
            history = truncate_metrics(metrics_path, run.start_step)  # without lines written after the checkpoint
    # A resumed run's wall time adds this sitting to the earlier ones (up to their last checkpoint).
    earlier_s = max((entry.get("wall_s", 0.0) for entry in history), default=0.0)
    model.train()

    def record_held_out(step: int) -> None:
        if not run.eval_batches:  # no held-out row (said at the start): nothing to measure, never a 0.0
            return
        losses = held_out_losses(model, run.eval_batches, device, dtype, world)
        if world.is_main:
            record(metrics_path, history, {"step": step, **losses})

    if run.start_step == 0:
        record_held_out(0)

    def save(step: int, rng: list[dict]) -> None:
        if world.is_main:
            save_checkpoint(out, step, model, run.optimizer, run.scaler, rng, settings, run.lora, run.fingerprint)

    completed, rng_after_completed = run.start_step, gather(world, rng_state())
    progress = tqdm(total=run.total_steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not world.is_main)
    try:
        for step in range(run.start_step, run.total_steps):
            step_started = time.time()
            lr = learning_rate(step, config.lr, run.warmup, run.total_steps)
            set_learning_rate(run.optimizer, lr)
            batches = [collate([run.examples[i] for i in micro], run.pad_id) for micro in run.windows[step]]
            looping = looping_batch([run.examples[i] for micro in run.windows[step] for i in micro], run.newline_ids,
                                    config.max_length, config.repetition_rows, f"{config.seed}:{step}:{world.rank}",
                                    run.pad_id, config.repetition_from_copy) if config.repetition else None
            loss_value, window_tokens, grad_norm, repetition_loss = optimizer_step(
                model, run.parameters, run.optimizer, run.scaler, batches, device, dtype, config.grad_clip, world,
                config.unlikelihood, looping, config.repetition)
            # Every rank's random state after this step, held by all: Ctrl-C can then save without
            # waiting for the other ranks.
            completed, rng_after_completed = step + 1, gather(world, rng_state())

            seconds = time.time() - step_started
            local_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
            tokens = int(sum_over_ranks(world, [local_tokens])[0])
            if world.is_main:
                record(metrics_path, history, {
                    "step": completed, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                    "supervised_tokens": window_tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                    "peak_memory_gb": peak_memory_bytes(device) / 1e9, "wall_s": earlier_s + time.time() - run.started,
                    **({"repetition_loss": repetition_loss} if repetition_loss is not None else {})})
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            progress.update(1)
            if completed % config.eval_every == 0 or completed == run.total_steps:
                record_held_out(completed)
            if completed % config.save_every == 0 or completed == run.total_steps:
                save(completed, rng_after_completed)
            if after_step is not None:
                after_step(completed)
    except KeyboardInterrupt:
        progress.close()
        # An interrupted window's gradients are discarded: the checkpoint holds the state after the
        # last completed step, with the random states as they were then.
        run.optimizer.zero_grad(set_to_none=True)
        save(completed, rng_after_completed)
        if not world.is_main:
            raise RankFailed(f"rank {world.rank}: interrupted") from None
        raise TrainError(f"interrupted: checkpoint at step {completed} saved in {out}; run again to resume") from None
    progress.close()
    if not world.is_main:
        return None
    save_adapter(model, out, run.lora)
    plot_losses(history, out / "training_loss.png")
    summary = summarize(model, history, earlier_s + time.time() - run.started, peak_memory_bytes(device), run.dropped,
                        {"epochs": config.epochs, "max_length": config.max_length, "qlora": config.qlora,
                         "processes": world.size, "compute_dtype": models.dtype_name(dtype),
                         "warmup_steps": run.warmup})  # as applied: --warmup-steps capped at 5% of the run
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default=defaults.model, help="Hugging Face id, local folder, or 'embedded' (Gemma 3 270M, default)")
    add("--dataset", default=defaults.dataset,
        help="Hugging Face dataset id, local .json/.jsonl/.parquet file or folder, or 'default' (embedded corpus)")
    add("--out", default=None, help="output folder (default: outputs/lora_r{rank} or outputs/qlora_r{rank}); "
        "a folder holding a checkpoint is resumed")
    add("--rank", type=COUNT, default=defaults.rank, help="LoRA rank r (default: %(default)s)")
    add("--alpha", type=POSITIVE, default=None, help="LoRA alpha (default: 2 * rank)")
    add("--dropout", type=DROPOUT, default=defaults.dropout, help="dropout on the LoRA input (default: %(default)s)")
    add("--targets", default=defaults.targets,
        help="comma-separated module names to adapt, or 'all-linear' (default: %(default)s)")
    add("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    add("--trainable-tokens", default=defaults.trainable_tokens,
        help="embedding rows trained as well (PEFT's trainable_token_indices; with a tied head, its rows too): "
             "'auto' (default) = the chat turn markers <start_of_turn>,<end_of_turn>, whose rows are untrained in "
             "pretrained Gemma checkpoints, so a model could not learn to end its answer; 'none'; or "
             "comma-separated tokens or ids")
    add("--token-lr-scale", type=POSITIVE, default=None,
        help=f"learning rate of the token rows as a multiple of --lr ({recipe_default('token_lr_scale')})")
    add("--qlora", action="store_true", help="quantize the decoder's linear layers to NF4 (QLoRA)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile each decoder layer (default: on for CUDA; off on the CPU, where `make bench` "
             "measured +4%% tokens/s with native bf16, within noise, and 1.01-1.27x without it: pass it there)")
    add("--gradient-checkpointing", action="store_true",
        help="recompute each decoder layer's activations in the backward pass: less memory, more compute")
    add("--batch-size", type=COUNT, default=defaults.batch_size, help="sequences per micro-batch (default: %(default)s)")
    add("--grad-accum", type=COUNT, default=defaults.grad_accum,
        help="micro-batches per optimizer step (default: %(default)s)")
    add("--lr", type=POSITIVE, default=None,
        help=f"peak learning rate ({recipe_default('lr')})")
    add("--weight-decay", type=NON_NEGATIVE, default=defaults.weight_decay, help="AdamW weight decay (default: %(default)s)")
    add("--warmup-steps", type=NON_NEGATIVE_INT, default=defaults.warmup_steps,
        help="linear warmup steps, capped at 5%% of the run (default: %(default)s)")
    add("--epochs", type=COUNT, default=None,
        help=f"passes over the data ({recipe_default('epochs')})")
    add("--max-steps", type=COUNT, default=None, help="stop after this many optimizer steps")
    add("--max-length", type=COUNT, default=None,
        help=f"drop longer rows ({recipe_default('max_length')})")
    add("--grad-clip", type=POSITIVE, default=defaults.grad_clip, help="gradient norm clip (default: %(default)s)")
    add("--unlikelihood", type=NON_NEGATIVE, default=defaults.unlikelihood,
        help="weight of a token-level unlikelihood term (Welleck et al. 2019) that pushes down, at each answer "
             "token, the answer's earlier tokens other than the right one: against greedy loops that repeat "
             "lines. The train loss logged includes it; the held-out loss does not (default: %(default)s, off)")
    add("--repetition", type=NON_NEGATIVE, default=None,
        help="weight of a pseudo-repetition loss (DITTO, Xu et al. 2022): each step also trains on a batch of "
             "training answers made to repeat a block of 1-3 of their lines, teaching each repetition to be half "
             "as likely as the one before, against greedy loops (rows: --repetition-rows); logged apart as "
             f"repetition_loss; 0 turns it off ({recipe_default('repetition')})")
    add("--repetition-from-copy", type=ranged(int, 2), default=defaults.repetition_from_copy,
        help="the first copy of a looping block that --repetition's loss applies to: 2 (the paper's) also teaches "
             "that a line written once should be less likely the second time, which can hurt copying a signature "
             "from the prompt; 3 leaves a line written twice alone (default: %(default)s)")
    add("--repetition-rows", type=COUNT, default=defaults.repetition_rows,
        help="looping rows that --repetition adds to each optimizer step (per process), each --max-length tokens "
             "long: one costs about a tenth of a step at batch 4 x 4 (default: %(default)s)")
    add("--seed", type=SEED, default=defaults.seed, help="seed for init, dropout and data order (default: %(default)s)")
    add("--save-every", type=COUNT, default=defaults.save_every, help="checkpoint every N steps (default: %(default)s)")
    add("--eval-every", type=COUNT, default=defaults.eval_every, help="held-out loss every N steps (default: %(default)s)")
    add("--eval-rows", type=COUNT, default=defaults.eval_rows, help="held-out rows for the loss (default: %(default)s)")
    add("--device", type=DEVICE, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    add("--overwrite", action="store_true", help="discard an existing checkpoint in --out instead of resuming")
    args = parser.parse_args(argv)
    values = vars(args)
    if values["out"] is None:
        values["out"] = f"outputs/{'qlora' if args.qlora else 'lora'}_r{args.rank}"
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    # Make a plain `kill` behave like Ctrl-C: save a checkpoint, then exit.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        summary = run(config)
    except RankFailed:  # under torchrun: the rank that failed says why, in one line; the others stop quietly
        return 2
    except (TrainError, CheckpointError, DataError, AdapterError, models.ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop started: there is nothing to save yet
        print("error: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    if summary is not None:
        print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

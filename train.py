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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import models
from chat_format import TURN_MARKERS
from checkpoint import (
    CheckpointError, data_fingerprint, hold_output_folder, rng_state, save_checkpoint, start_or_resume,
)
from data.dataset import IGNORE_INDEX, DataError, batch_order, collate, encode_rows, load_rows, split_rows
from lora import (
    ATTENTION_MODULES, AdapterError, LoRAConfig, describe_token_rows, inject_lora, inject_trainable_tokens,
    parse_target_modules, save_adapter, token_rows, trainable_report,
)
from loss import count_supervised, decoder_hidden, loss_sum_at, supervised_loss_sum
from options import COUNT, DEVICE, DROPOUT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE
from training_log import (
    peak_memory_bytes, plot_losses, record, summarize, summary_line, truncate_metrics, write_settings,
)

# On this 2-core CPU the study's 3 epochs at length 768 on the embedded corpus would take hours;
# the embedded default trains less (README: "Training on the embedded defaults").
EMBEDDED_CPU_EPOCHS = 1
EMBEDDED_CPU_MAX_LENGTH = 512
STUDY_EPOCHS = 3
STUDY_MAX_LENGTH = 768


class TrainError(RuntimeError):
    """A run cannot start or resume; the message is one line meant for the user."""


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
    token_lr_scale: float = 10.0  # the token rows' learning rate = this x the LoRA one (chosen by measurement: README)
    qlora: bool = False
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2.5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 150
    epochs: int | None = None  # None: the study's 3, or EMBEDDED_CPU_EPOCHS for the embedded default on a CPU
    max_steps: int | None = None
    max_length: int | None = None  # None: the study's 768, or EMBEDDED_CPU_MAX_LENGTH likewise
    grad_clip: float = 1.0
    seed: int = 42
    save_every: int = 25  # a checkpoint is small (adapter + AdamW state): a killed run loses little
    eval_every: int = 50
    eval_rows: int = 64
    device: str | None = None
    overwrite: bool = False

    def lora_config(self, token_ids: tuple[int, ...] = ()) -> LoRAConfig:
        base_name = "google/gemma-3-270m" if self.model == models.EMBEDDED_MODEL else self.model
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=parse_target_modules(self.targets), use_rslora=self.rslora,
                          base_model_name_or_path=base_name, trainable_token_indices=token_ids)


def resolve_defaults(config: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill the settings left to their defaults (alpha, epochs, length cap)."""
    embedded_on_cpu = config.model == models.EMBEDDED_MODEL and config.dataset == "default" and device.type == "cpu"
    return dataclasses.replace(
        config,
        alpha=config.alpha if config.alpha is not None else 2.0 * config.rank,
        epochs=config.epochs or (EMBEDDED_CPU_EPOCHS if embedded_on_cpu else STUDY_EPOCHS),
        max_length=config.max_length or (EMBEDDED_CPU_MAX_LENGTH if embedded_on_cpu else STUDY_MAX_LENGTH),
    )


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
    model = models.load_model(config.model, device, dtype, nf4=config.qlora)
    lora = config.lora_config(token_ids)
    inject_lora(model, lora)
    if token_ids:
        inject_trainable_tokens(model, token_ids)
    return model


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


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in `dtype`; float32 means none (autocast has no float32 mode)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def accumulate_gradients(model, batches: list[dict], device: torch.device, dtype: torch.dtype,
                         scaler: torch.amp.GradScaler) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches; returns (window loss, supervised tokens).

    The loss is averaged per supervised token over the whole window, which makes batch 4 x
    accumulation 4 the same gradient as batch 16 x 1 (a mean of per-micro-batch means would not be).
    """
    window_tokens = sum(count_supervised(batch) for batch in batches)
    loss_value = 0.0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast(device, dtype):
            loss = supervised_loss_sum(model, batch) / window_tokens
        scaler.scale(loss).backward()
        loss_value += loss.item()
    return loss_value, window_tokens


def make_optimizer(model, config: TrainConfig, device: torch.device, dtype: torch.dtype):
    """(trainable parameters, AdamW over them, GradScaler: active only for float16).

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
    return lora + rows, optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_step(model, parameters: list, optimizer, scaler, batches: list[dict], device: torch.device,
                   dtype: torch.dtype, grad_clip: float) -> tuple[float, int, float]:
    """One optimizer step over its micro-batches; returns (loss, supervised tokens, gradient norm)."""
    loss, tokens = accumulate_gradients(model, batches, device, dtype, scaler)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip).item()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens, grad_norm


def held_out_losses(model, batches: list[dict], device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Mean loss per supervised token, and the mean loss of each row's last label alone (the closing
    `<end_of_turn>`: whether the model knows where its answer ends)."""
    model.eval()
    loss = end_loss = tokens = rows = 0.0
    with torch.no_grad(), autocast(device, dtype):
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            hidden = decoder_hidden(model, batch)
            targets = batch["labels"][:, 1:]
            supervised = targets != IGNORE_INDEX
            last = supervised & ~torch.nn.functional.pad(supervised[:, 1:], (0, 1))
            loss += loss_sum_at(model, hidden, targets, supervised).item()
            end_loss += loss_sum_at(model, hidden, targets, last).item()
            tokens += int(supervised.sum())
            rows += int(last.sum())
    model.train()
    return {"held_out_loss": loss / max(tokens, 1), "held_out_end_loss": end_loss / max(rows, 1)}


def run(config: TrainConfig, after_step: Callable[[int], None] | None = None) -> dict:
    """Train (or resume) as `config` says; returns the summary. `after_step(step)` is called after
    each optimizer step (benchmarks time steps with it; tests kill the process with it)."""
    device = models.pick_device(config.device)
    config = resolve_defaults(config, device)
    with hold_output_folder(Path(config.out)):
        return _train(config, device, after_step)


def _train(config: TrainConfig, device: torch.device, after_step: Callable[[int], None] | None) -> dict:
    dtype = models.pick_compute_dtype(device)
    out = Path(config.out)
    started = time.time()
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    tokenizer = models.load_tokenizer(config.model)
    train_rows, test_rows = split_rows(load_rows(config.dataset))
    examples, dropped = encode_rows(tokenizer, train_rows, config.max_length)
    held_out, _ = encode_rows(tokenizer, test_rows.select(range(min(config.eval_rows, len(test_rows)))),
                              config.max_length)
    if not examples:
        raise TrainError(f"no training row fits --max-length {config.max_length}")
    print(f"data: {len(examples):,} training rows ({dropped:,} longer than {config.max_length} tokens dropped), "
          f"{len(held_out)} held-out rows for the loss")
    schedule = schedule_micro_batches([len(e["input_ids"]) for e in examples], config)
    windows = [schedule[i:i + config.grad_accum] for i in range(0, len(schedule), config.grad_accum)]
    total_steps = min(len(windows), config.max_steps or len(windows))
    warmup = warmup_for(total_steps, config.warmup_steps)
    fingerprint = data_fingerprint(examples, schedule)
    eval_batches = [collate(held_out[i:i + config.batch_size], tokenizer.pad_token_id)
                    for i in range(0, len(held_out), config.batch_size)]

    token_ids = resolve_trainable_tokens(config.trainable_tokens, tokenizer)
    lora = config.lora_config(token_ids)
    model = prepare_model(config, device, dtype, token_ids)
    if token_ids:
        print(describe_token_rows(model, tokenizer, token_ids))
    print(trainable_report(model))
    parameters, optimizer, scaler = make_optimizer(model, config, device, dtype)

    start_step = start_or_resume(out, dataclasses.asdict(config), fingerprint, model, optimizer, scaler,
                                 config.overwrite)
    metrics_path = out / "metrics.jsonl"
    if start_step == 0:
        metrics_path.unlink(missing_ok=True)
        write_settings(out, dataclasses.asdict(config))
        history = []
    else:
        history = truncate_metrics(metrics_path, start_step)  # without lines written after the checkpoint
    model.train()
    if start_step == 0:
        record(metrics_path, history, {"step": 0, **held_out_losses(model, eval_batches, device, dtype)})

    completed, rng_after_completed = start_step, rng_state()
    progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    try:
        for step in range(start_step, total_steps):
            step_started = time.time()
            lr = learning_rate(step, config.lr, warmup, total_steps)
            set_learning_rate(optimizer, lr)
            batches = [collate([examples[i] for i in micro], tokenizer.pad_token_id) for micro in windows[step]]
            loss_value, window_tokens, grad_norm = optimizer_step(
                model, parameters, optimizer, scaler, batches, device, dtype, config.grad_clip)
            completed, rng_after_completed = step + 1, rng_state()

            seconds = time.time() - step_started
            tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
            record(metrics_path, history, {
                "step": completed, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "supervised_tokens": window_tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "peak_memory_gb": peak_memory_bytes(device) / 1e9})
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            progress.update(1)
            if completed % config.eval_every == 0 or completed == total_steps:
                record(metrics_path, history, {"step": completed, **held_out_losses(model, eval_batches, device, dtype)})
            if completed % config.save_every == 0 or completed == total_steps:
                save_checkpoint(out, completed, model, optimizer, scaler, rng_after_completed,
                                dataclasses.asdict(config), lora, fingerprint)
            if after_step is not None:
                after_step(completed)
    except KeyboardInterrupt:
        progress.close()
        # An interrupted window's gradients are discarded: the checkpoint holds the state after the
        # last completed step, with the random state as it was then.
        optimizer.zero_grad(set_to_none=True)
        save_checkpoint(out, completed, model, optimizer, scaler, rng_after_completed, dataclasses.asdict(config),
                        lora, fingerprint)
        raise TrainError(f"interrupted: checkpoint at step {completed} saved in {out}; run again to resume") from None
    progress.close()

    save_adapter(model, out, lora)
    plot_losses(history, out / "training_loss.png")
    summary = summarize(model, history, time.time() - started, peak_memory_bytes(device), dropped,
                        {"epochs": config.epochs, "max_length": config.max_length, "qlora": config.qlora})
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
    add("--token-lr-scale", type=POSITIVE, default=defaults.token_lr_scale,
        help="learning rate of the token rows as a multiple of --lr (default: %(default)s)")
    add("--qlora", action="store_true", help="quantize the decoder's linear layers to NF4 (QLoRA)")
    add("--batch-size", type=COUNT, default=defaults.batch_size, help="sequences per micro-batch (default: %(default)s)")
    add("--grad-accum", type=COUNT, default=defaults.grad_accum,
        help="micro-batches per optimizer step (default: %(default)s)")
    add("--lr", type=POSITIVE, default=defaults.lr, help="peak learning rate (default: %(default)s)")
    add("--weight-decay", type=NON_NEGATIVE, default=defaults.weight_decay, help="AdamW weight decay (default: %(default)s)")
    add("--warmup-steps", type=NON_NEGATIVE_INT, default=defaults.warmup_steps,
        help="linear warmup steps, capped at 5%% of the run (default: %(default)s)")
    add("--epochs", type=COUNT, default=None,
        help=f"passes over the data (default: {STUDY_EPOCHS}; {EMBEDDED_CPU_EPOCHS} for the embedded defaults on a CPU)")
    add("--max-steps", type=COUNT, default=None, help="stop after this many optimizer steps")
    add("--max-length", type=COUNT, default=None,
        help=f"drop longer rows (default: {STUDY_MAX_LENGTH}; {EMBEDDED_CPU_MAX_LENGTH} for the embedded defaults on a CPU)")
    add("--grad-clip", type=POSITIVE, default=defaults.grad_clip, help="gradient norm clip (default: %(default)s)")
    add("--seed", type=int, default=defaults.seed, help="seed for init, dropout and data order (default: %(default)s)")
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
    except (TrainError, CheckpointError, DataError, AdapterError, models.ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop started: there is nothing to save yet
        print("error: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

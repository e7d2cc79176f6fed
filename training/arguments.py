"""train.py's command line: every TrainConfig setting as a flag with its range and its default (the
recipe's, where the recipe decides), and --config FILE, whose settings the flags given as well override."""

from __future__ import annotations

import argparse

from common.files import OUTPUTS, FileError
from common.options import COUNT, DEVICE, DROPOUT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SEED, ranged
from training.config import EMBEDDED, STUDY, TrainConfig
from training.config_file import settings_from_file
from training.reporting import report_target


def recipe_default(field: str) -> str:
    """The --help text of a setting the recipe fills: both recipes' values."""
    return (f"default: {getattr(EMBEDDED, field):g} for the embedded model and corpus, "
            f"{getattr(STUDY, field):g} (the study's) otherwise")


def parse_args(argv: list[str] | None, description: str | None = None) -> TrainConfig:
    """The TrainConfig that `argv` asks for; argparse's one-line error and exit code 2 on bad input (a bad
    --config file too)."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags = {}  # setting name -> its flag, to check a file's values as the flag checks them

    def add(*names: str, **options) -> None:
        action = parser.add_argument(*names, **options)
        flags[action.dest] = action

    parser.add_argument("--config", metavar="FILE",
                        help="the settings of a YAML file: a recipe (recipes/*.yaml) or a run's train_config.json; "
                             "flags given as well override it")
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
    add("--rslora", action=argparse.BooleanOptionalAction, default=defaults.rslora,
        help="scale by alpha/sqrt(r) instead of alpha/r")
    add("--trainable-tokens", default=defaults.trainable_tokens,
        help="embedding rows trained as well (PEFT's trainable_token_indices; with a tied head, its rows too): "
             "'auto' (default) = the chat turn markers <start_of_turn>,<end_of_turn>, whose rows are untrained in "
             "pretrained Gemma checkpoints, so a model could not learn to end its answer; 'none'; or "
             "comma-separated tokens or ids")
    add("--token-lr-scale", type=POSITIVE, default=None,
        help=f"learning rate of the token rows as a multiple of --lr ({recipe_default('token_lr_scale')})")
    add("--qlora", action=argparse.BooleanOptionalAction, default=defaults.qlora,
        help="quantize the decoder's linear layers to NF4 (QLoRA)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile each decoder layer (default: on for CUDA; off on the CPU, where `make bench` "
             "shows no reliable gain: pass it to try)")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=defaults.gradient_checkpointing,
        help="recompute each decoder layer's activations in the backward pass: less memory, more compute")
    add("--batch-size", type=COUNT, default=defaults.batch_size, help="sequences per micro-batch (default: %(default)s)")
    add("--grad-accum", type=COUNT, default=defaults.grad_accum,
        help="micro-batches per optimizer step (default: %(default)s)")
    add("--lr", type=POSITIVE, default=None,
        help=f"peak learning rate ({recipe_default('lr')})")
    add("--weight-decay", type=NON_NEGATIVE, default=defaults.weight_decay, help="AdamW weight decay (default: %(default)s)")
    add("--warmup-steps", type=NON_NEGATIVE_INT, default=defaults.warmup_steps,
        help="linear warmup steps, applied as asked; longer than the run is an error (default: 5%% of the run, "
             "at most the study's 150)")
    add("--epochs", type=COUNT, default=None,
        help=f"passes over the data ({recipe_default('epochs')})")
    add("--max-steps", type=COUNT, default=None, help="stop after this many optimizer steps")
    add("--schedule-steps", type=COUNT, default=None,
        help="optimizer steps the learning rate's warmup and cosine span; at least the run's, which is the default. "
             "A run's train_config.json records it, so that re-running that file with --max-steps N trains "
             "exactly the run's first N steps")
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
        help="looping rows that --repetition adds to each optimizer step (shared among processes), each --max-length tokens "
             "long: one costs about a tenth of a step at batch 4 x 4 (default: %(default)s)")
    add("--seed", type=SEED, default=defaults.seed, help="seed for init, dropout and data order (default: %(default)s)")
    add("--save-every", type=COUNT, default=defaults.save_every, help="checkpoint every N steps (default: %(default)s)")
    add("--eval-every", type=COUNT, default=defaults.eval_every, help="held-out loss every N steps (default: %(default)s)")
    add("--eval-rows", type=COUNT, default=defaults.eval_rows, help="held-out rows for the loss (default: %(default)s)")
    add("--report-to", type=report_target, default=defaults.report_to,
        help="also log every number of metrics.jsonl to TensorBoard, in OUT/tensorboard (tensorboard: make tensorboard "
             "installs it and shows the runs), or nowhere else (default: %(default)s)")
    add("--device", type=DEVICE, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    add("--overwrite", action=argparse.BooleanOptionalAction, default=defaults.overwrite,
        help="discard an existing checkpoint in --out instead of resuming")
    args = parser.parse_args(argv)
    if args.config is not None:
        try:
            parser.set_defaults(**settings_from_file(args.config, flags))
        except FileError as error:
            parser.error(str(error))
        args = parser.parse_args(argv)
    values = {key: value for key, value in vars(args).items() if key != "config"}
    if values["out"] is None:
        values["out"] = f"{OUTPUTS}/{'qlora' if args.qlora else 'lora'}_r{args.rank}"
    return TrainConfig(**values)

"""A training run's settings (TrainConfig) and the two recipes that fill the ones left unset: the
embedded model and corpus get their tuned recipe, any other model or data the study's. The recipe
follows the model and the data, never the device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.files import OUTPUTS
from gemma.loading import EMBEDDED_MODEL
from lora import ATTENTION_MODULES, LoRAConfig, parse_target_modules


@dataclass(frozen=True)
class Recipe:
    """The settings that depend on what a run trains (filled in where TrainConfig leaves them None)."""
    epochs: int
    max_length: int  # longer rows are dropped
    lr: float  # peak learning rate of the LoRA matrices
    token_lr_scale: float  # the token rows' learning rate = this x lr
    repetition: float  # weight of the pseudo-repetition (DITTO) loss; 0 = off


# The study's: 3 epochs at length 768, lr 2.5e-4; the token rows at 10x (chosen by measurement,
# docs/experiments.md).
STUDY = Recipe(epochs=3, max_length=768, lr=2.5e-4, token_lr_scale=10.0, repetition=0.0)
# The embedded model and corpus: 2 epochs on the rows of up to 256 tokens at 4x the study's learning rate
# (its steps are 5% of the study's), the token rows at 2.5e-3, with pseudo-repetition training against
# greedy loops: each of these measured better on every rate (docs/training.md, docs/experiments.md). Sized
# for a 2-core CPU, and the same on a GPU, so that one command trains one model everywhere.
EMBEDDED = Recipe(epochs=2, max_length=256, lr=1e-3, token_lr_scale=2.5, repetition=1.0)


@dataclass
class TrainConfig:
    model: str = EMBEDDED_MODEL
    dataset: str = "default"
    out: str = f"{OUTPUTS}/lora_r16"
    rank: int = LoRAConfig.rank
    alpha: float | None = None  # None: 2 * rank, as in the study's rank sweep
    dropout: float = LoRAConfig.dropout
    targets: str = ",".join(ATTENTION_MODULES)
    rslora: bool = False
    trainable_tokens: str = "auto"  # "auto" (the turn markers), "none", or token strings / ids, comma-separated
    token_lr_scale: float | None = None  # the token rows' learning rate = this x lr; None: the recipe's
    qlora: bool = False
    compile: bool | None = None  # compile each decoder layer; None: on CUDA only (setup.compiles_layers)
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass
    batch_size: int = 4
    grad_accum: int = 4
    lr: float | None = None  # None: the recipe's (EMBEDDED for the embedded model and corpus, else STUDY)
    weight_decay: float = 0.01
    warmup_steps: int | None = None  # None: 5% of the run, at most the study's 150; given: applied as asked
    epochs: int | None = None  # None: the recipe's
    max_steps: int | None = None
    # The steps the learning rate warms up and decays over; None: the run's own (filled in when it starts, so
    # that its train_config.json re-run with --max-steps N trains exactly the run's first N steps).
    schedule_steps: int | None = None
    max_length: int | None = None  # None: the recipe's
    grad_clip: float = 1.0
    unlikelihood: float = 0.0  # weight of the token-level unlikelihood term against repeating the answer's tokens
    repetition: float | None = None  # weight of the DITTO loss of one looping batch per step (training/repetition.py); None: the recipe's
    repetition_from_copy: int = 3  # the first copy of a looping block that the DITTO loss applies to (the paper's: 2)
    repetition_rows: int = 1  # looping rows per optimizer step, shared among the processes; each --max-length tokens long
    seed: int = 42
    save_every: int = 25  # a checkpoint is small (adapter + AdamW state): a killed run loses little
    eval_every: int = 100  # each held-out pass costs about 1.5 optimizer steps on the CPU
    eval_rows: int = 64
    report_to: str = "none"  # where the metrics go besides metrics.jsonl: none or tensorboard (training/reporting.py)
    device: str | None = None
    overwrite: bool = False

    def lora_config(self, token_ids: tuple[int, ...] = ()) -> LoRAConfig:
        base_name = "google/gemma-3-270m" if self.model == EMBEDDED_MODEL else self.model
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=parse_target_modules(self.targets), use_rslora=self.rslora,
                          base_model_name_or_path=base_name, trainable_token_indices=token_ids)


def resolve_defaults(config: TrainConfig) -> TrainConfig:
    """Fill the settings left to their defaults (alpha, and the recipe's). `compile` stays as given: it
    changes speed, not what is trained, and its default depends on the device (setup.compiles_layers)."""
    recipe = EMBEDDED if config.model == EMBEDDED_MODEL and config.dataset == "default" else STUDY
    return dataclasses.replace(
        config,
        alpha=config.alpha if config.alpha is not None else 2.0 * config.rank,
        **{field.name: getattr(recipe, field.name) for field in dataclasses.fields(Recipe)
           if getattr(config, field.name) is None},
    )

"""The four training variants, each run in its own process by `python -m bench` (so each has its own
peak memory), on the same micro-batches in the same order:

    lora        our loop (training/'s prepare_model and optimizer_step), LoRA on a base in our compute dtype
    qlora       the same on our NF4 base (prepare_model with qlora=True)
    peft-lora   PEFT LoRA + Hugging Face Trainer, the model loaded in our compute dtype (bf16=True with bf16)
    peft-qlora  PEFT LoRA + Trainer on a bitsandbytes 4-bit base (NF4, double quantization, our
                compute), prepared with peft.prepare_model_for_kbit_training as the study did (which
                also switches on gradient checkpointing and casts the non-quantized weights to fp32)

and the same with an option: `+compile` (ours: train.py --compile, each decoder layer compiled;
PEFT: TrainingArguments(torch_compile=True), the switch a Trainer user would flip), `+ckpt`
(ours: train.py --gradient-checkpointing) or `+nodrop` (ours and PEFT: LoRA dropout 0, what the
dropout's random masks cost).

All use TrainConfig's defaults, resolved for the model and device as train.py resolves them
(LoRA r=16, alpha 32, dropout 0.05 on q/k/v/o, batch 4 x accumulation 4, weight decay 0.01, clip 1.0;
lr 1e-3 for the embedded defaults on a CPU, else the study's 2.5e-4). The learning rate is held
constant (no warmup or decay) in every variant, so the schedules cannot differ.

    python -m bench.training --variant lora --settings '{"model": "embedded", ...}' --result out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from bench.measure import TrainingMeter, useful_step_flops
from common import hardware
from data.dataset import collate, encode_rows, load_rows, split_rows
from gemma import loading
from training import loop
from training.config import STUDY, TrainConfig, resolve_defaults
from training.loss import count_supervised
from training.optimizer import make_optimizer
from training.setup import prepare_model
from training.step import optimizer_step

VARIANTS = ("lora", "qlora", "peft-lora", "peft-qlora", "lora+compile", "qlora+compile", "peft-lora+compile",
            "lora+ckpt", "qlora+ckpt", "lora+nodrop", "peft-lora+nodrop")
# What `make bench` runs by default: the CPU has no use for checkpointing (memory is plenty) and
# compiling QLoRA adds nothing the LoRA row would not show.
DEFAULT_VARIANTS = {"cpu": ("lora", "qlora", "peft-lora", "peft-qlora", "lora+compile", "peft-lora+compile",
                            "lora+nodrop", "peft-lora+nodrop"),
                    "cuda": VARIANTS}
# Random weights with Gemma-2-2B's exact shapes, for GPU runs (no download, no tokenizer needed).
RANDOM_GEMMA2_2B = "random-gemma-2-2b"
RANDOM_MODEL_LENGTH = STUDY.max_length  # random-model rows are exactly the study's max length
RANDOM_MODEL_PROMPT_FRACTION = 0.25  # the first quarter of each random row is "prompt", unlabelled

Example = dict[str, list[int]]
Window = list[list[Example]]  # one optimizer step: its micro-batches, each a list of examples


@dataclass(frozen=True)
class BenchSettings:
    model: str = loading.EMBEDDED_MODEL
    dataset: str = "default"
    device: str = "cpu"
    steps: int = 3
    warmup_steps: int = 1
    max_length: int | None = None  # None: train.py's default for this model and data
    profile: bool = False  # torch.profiler over the timed steps (bench/profile.py); slows them down

    def train_config(self, variant: str) -> TrainConfig:
        """train.py's config with its hyper-parameters for this model and data (resolve_defaults); compile,
        checkpointing and dropout 0 only where the variant names them."""
        model, max_length = self.model, self.max_length
        if model == RANDOM_GEMMA2_2B:
            model, max_length = str(random_model_dir()), max_length or RANDOM_MODEL_LENGTH
        base, _, option = variant.partition("+")
        config = TrainConfig(model=model, dataset=self.dataset, qlora=base.endswith("qlora"), device=self.device,
                                   max_length=max_length, compile=option == "compile",
                                   gradient_checkpointing=option == "ckpt",
                                   dropout=0.0 if option == "nodrop" else TrainConfig.dropout)
        return resolve_defaults(config)


# ---------------------------------------------------------------------------------- the data

def training_windows(settings: BenchSettings, config: TrainConfig,
                     ) -> tuple[list[Window], int, PreTrainedTokenizerBase | None]:
    """The first warmup + timed optimizer steps of train.py's own schedule (same rows, same grouping),
    with the pad id and the tokenizer (None for the random model, whose rows are random ids).

    Steps holding a short micro-batch (the end of a length-sorted chunk) are skipped: the Trainer
    cuts its own batches from the rows in order, and a short one would shift every later batch."""
    total = settings.warmup_steps + settings.steps
    if settings.model == RANDOM_GEMMA2_2B:
        examples = random_examples(total * config.batch_size * config.grad_accum, config)
        micro_batches = [list(range(i, i + config.batch_size)) for i in range(0, len(examples), config.batch_size)]
        tokenizer, pad_id = None, 0
    else:
        tokenizer = loading.load_tokenizer(config.model)
        train_rows, _ = split_rows(load_rows(config.dataset))
        examples, _ = encode_rows(tokenizer, train_rows, config.max_length)
        micro_batches = loop.schedule_micro_batches([len(e["input_ids"]) for e in examples], config)
        pad_id = tokenizer.pad_token_id
    windows = [micro_batches[start:start + config.grad_accum] for start in range(0, len(micro_batches), config.grad_accum)]
    full = [window for window in windows
            if len(window) == config.grad_accum and all(len(micro) == config.batch_size for micro in window)]
    if len(full) < total:
        raise ValueError(f"the data holds {len(full)} full optimizer steps, fewer than the {total} asked for")
    return [[[examples[i] for i in micro] for micro in window] for window in full[:total]], pad_id, tokenizer


def random_examples(count: int, config: TrainConfig) -> list[Example]:
    vocab = AutoConfig.from_pretrained(config.model).vocab_size
    generator = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(3, vocab, (count, config.max_length), generator=generator)  # 0-2: pad, eos, bos
    labels = ids.clone()
    labels[:, :int(config.max_length * RANDOM_MODEL_PROMPT_FRACTION)] = -100
    return [{"input_ids": row.tolist(), "labels": row_labels.tolist()} for row, row_labels in zip(ids, labels)]


def random_model_dir() -> Path:
    """A bf16 model folder with Gemma-2-2B's shapes and random weights, written once to the cache."""
    target = loading.CACHE_DIR / RANDOM_GEMMA2_2B
    if (target / "config.json").exists():
        return target
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(  # google/gemma-2-2b's config.json, by value
        vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh", pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initializing 2.6B weights is quick on a GPU, slow on a CPU
        model = Gemma2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".random-", dir=target.parent))  # renamed when complete
    model.save_pretrained(staging)
    staging.rename(target)
    return target


# ---------------------------------------------------------------------------------- the variants

def run_ours(windows: list[Window], pad_id: int, config: TrainConfig, meter: TrainingMeter) -> list[float]:
    """loop.run's optimizer step (optimizer_step), without its evaluation and checkpoints;
    returns each step's loss."""
    device = meter.device
    dtype = hardware.pick_compute_dtype(device)
    torch.manual_seed(config.seed)
    model = prepare_model(config, config.lora_config(), device, dtype)
    model.train()
    parameters, optimizer = make_optimizer(model, config)
    losses = []
    meter.start()
    for window in windows:
        batches = [collate(micro, pad_id) for micro in window]
        loss, *_ = optimizer_step(model, parameters, optimizer, batches, device, dtype,
                                          config.grad_clip)
        meter.tick()
        losses.append(loss)
    return losses


def run_peft(windows: list[Window], tokenizer: PreTrainedTokenizerBase | None, config: TrainConfig,
             meter: TrainingMeter) -> list[float]:
    """The study's stack: PEFT LoRA trained by transformers.Trainer with its own collator."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, default_data_collator

    device = meter.device
    dtype = hardware.pick_compute_dtype(device)
    torch.manual_seed(config.seed)
    if config.qlora:
        model = prepare_model_for_kbit_training(load_bitsandbytes_4bit(config.model, device, dtype))
    else:
        model = loading.load_model(config.model, device, dtype)  # same weights and attention as ours
    lora = config.lora_config()
    model = get_peft_model(model, LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", task_type="CAUSAL_LM"))
    if tokenizer is not None:
        tokenizer.padding_side = "right"  # as our collate pads, so both see the same batches
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    else:
        collator = default_data_collator  # random-model rows all have the same length
    losses: list[float] = []

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as scratch:
        rows = [example for window in windows for micro in window for example in micro]
        Trainer(model=model, args=trainer_arguments(config, len(windows), device, scratch), train_dataset=rows,
                data_collator=collator, callbacks=[Timing()]).train()
    return losses


def trainer_arguments(config: TrainConfig, steps: int, device: torch.device, scratch: str):
    """The Trainer's settings: train.py's hyper-parameters, a constant rate, nothing saved or reported."""
    from transformers import TrainingArguments

    dtype = hardware.pick_compute_dtype(device)
    return TrainingArguments(
        output_dir=scratch, max_steps=steps, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, lr_scheduler_type="constant",
        weight_decay=config.weight_decay, max_grad_norm=config.grad_clip, optim="adamw_torch",
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device.type == "cpu",
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
        seed=config.seed, disable_tqdm=True, remove_unused_columns=False, torch_compile=config.compile,
    )


def load_bitsandbytes_4bit(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    path = loading.resolve_model_path(name)
    config = AutoConfig.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=dtype, device_map={"": str(device)},
        attn_implementation=loading.attention_implementation(config.model_type))


# ---------------------------------------------------------------------------------- one variant

def measure_variant(variant: str, settings: BenchSettings) -> dict:
    """Train `variant` for warmup + timed steps; per-step figures for the report."""
    config = settings.train_config(variant)
    windows, pad_id, tokenizer = training_windows(settings, config)
    device = hardware.pick_device(settings.device)
    meter = TrainingMeter(device, profile_after=settings.warmup_steps if settings.profile else None)
    if variant.startswith("peft"):
        losses = run_peft(windows, tokenizer, config, meter)
    else:
        losses = run_ours(windows, pad_id, config, meter)
    profile = {"profile": meter.profiled_operators(), "profiled_steps": settings.steps,
               "profiled_seconds": sum(meter.step_seconds()[settings.warmup_steps:])} if settings.profile else {}
    model_config = AutoConfig.from_pretrained(loading.resolve_model_path(config.model))
    model_config = getattr(model_config, "text_config", model_config)
    rows_per_step = [[e for micro in window for e in micro] for window in windows]
    supervised = [sum(count_supervised(collate(micro, pad_id)) for micro in window) for window in windows]
    return {
        "variant": variant,
        "step_seconds": meter.step_seconds(),
        "losses": losses,
        "supervised_tokens": supervised,
        "useful_flops": [useful_step_flops(model_config, config.rank, [len(e["input_ids"]) for e in rows], count)
                         for rows, count in zip(rows_per_step, supervised)],
        "peak_training_bytes": meter.training_peak_bytes(),
        "peak_loading_bytes": meter.loading_peak_bytes,
        "max_length": config.max_length,
        **profile,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--settings", required=True, help="BenchSettings as JSON")
    parser.add_argument("--result", required=True, help="JSON file to write the measurements to")
    args = parser.parse_args(argv)
    settings = BenchSettings(**json.loads(args.settings))
    try:
        result = measure_variant(args.variant, settings)
    except ValueError as error:  # e.g. too few rows for the steps asked for: one line, not a traceback
        raise SystemExit(f"python -m bench.training: error: {error}") from None
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

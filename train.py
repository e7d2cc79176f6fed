"""Fine-tune a Gemma model with LoRA or QLoRA in one plain PyTorch loop (no Trainer, no PEFT).

    python train.py                          # LoRA r=16 on the embedded Gemma 3 270M and corpus
    python train.py --qlora                  # the same on an NF4-quantized base
    python train.py --config recipes/study-gemma-2-2b.yaml   # the study's run, from a file of settings
    python train.py --config outputs/lora_r16/train_config.json --out outputs/again   # a run again

The loop, top to bottom: load the model (and quantize it for QLoRA), inject LoRA into q/k/v/o,
tokenize the data, then for each optimizer step accumulate micro-batches with the loss averaged
per supervised token over the whole window, clip, step AdamW with the warmup + cosine learning
rate, and every --save-every steps write a checkpoint that resumes bit for bit. Starting again with
the same output folder resumes; Ctrl-C saves a checkpoint and exits.
"""

from __future__ import annotations

import signal
import sys

from data.dataset import DataError
from gemma.loading import ModelLoadError
from lora import AdapterError
from training.arguments import parse_args
from training.checkpoint import CheckpointError
from training.distributed import RankFailed
from training.loop import run
from training.run_log import summary_line
from training.setup import TrainError


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv, __doc__)
    # Make a plain `kill` behave like Ctrl-C: save a checkpoint, then exit.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        summary = run(config)
    except RankFailed:  # under torchrun: the rank that failed says why, in one line; the others stop quietly
        return 2
    # A bad --device (DeviceError) is a ValueError.
    except (TrainError, CheckpointError, DataError, AdapterError, ModelLoadError, ValueError) as error:
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

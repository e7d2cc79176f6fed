"""Does generation run a QLoRA adapter as training ran it?

Training runs the adapter over NF4Linear layers (bitsandbytes dequantizes each 4-bit weight at every call)
under autocast; generation (`gemma.generation.Generator.load`) dequantizes the weights once into plain
linear layers and runs without autocast. Both should be one computation up to the rounding of the compute
dtype. This loads a trained adapter both ways and compares them on held-out rows (prompt and reference
answer, teacher-forced): the logits of every answer position, the tokens they would pick, and the loss per
answer token. For scale it also runs the same adapter on the float (not 4-bit) base: what the NF4 rounding
itself moves.

    python -m bench.qlora_parity outputs/qlora_r16 [--rows 64]
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from common import hardware
from common.options import COUNT
from data.dataset import IGNORE_INDEX, encode_example, load_rows, split_rows
from gemma import loading
from gemma.generation import Generator, load_base
from lora import load_adapter
from lora.adapter import trained_on_nf4
from training.step import autocast


def training_model(model_name: str, adapter: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The adapter as train.py runs it: on NF4Linear layers, under autocast."""
    model = loading.load_model(model_name, device, dtype, nf4=True)
    load_adapter(model, adapter)
    return model


def answer_logits(model: torch.nn.Module, example: dict, device: torch.device, dtype: torch.dtype,
                  under_autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of the positions that predict an answer token, and those tokens. One row at a time:
    a row's logits over Gemma's 262k-token vocabulary take hundreds of MB."""
    with torch.inference_mode(), autocast(device, dtype if under_autocast else torch.float32):
        ids = torch.tensor([example["input_ids"]], device=device)
        labels = torch.tensor(example["labels"][1:], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
    answer = labels != IGNORE_INDEX
    return logits[answer], labels[answer]


class Agreement:
    """Two models' logits on the same answer positions, summed over rows: the largest logit difference, the
    share of positions where they pick the same token, and each one's loss per answer token."""

    def __init__(self):
        self.max_difference, self.same_top, self.positions, self.losses = 0.0, 0, 0, [0.0, 0.0]

    def add(self, first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> None:
        (logits_a, targets), (logits_b, _) = first, second
        self.max_difference = max(self.max_difference, float((logits_a - logits_b).abs().max()))
        self.same_top += int((logits_a.argmax(-1) == logits_b.argmax(-1)).sum())
        self.positions += len(targets)
        for side, logits in enumerate((logits_a, logits_b)):
            self.losses[side] += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))

    @property
    def same_top_share(self) -> float:
        return self.same_top / self.positions

    def mean_losses(self) -> tuple[float, float]:
        return self.losses[0] / self.positions, self.losses[1] / self.positions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="a QLoRA adapter folder written by train.py --qlora")
    loading.add_model_option(parser)
    parser.add_argument("--dataset", default="default", help="whose held-out rows (default: the embedded corpus)")
    parser.add_argument("--rows", type=COUNT, default=64, help="held-out rows compared (default: %(default)s)")
    args = parser.parse_args(argv)
    if not trained_on_nf4(args.adapter):
        print(f"qlora_parity: error: {args.adapter} was not trained on an NF4 base (train_config.json)", file=sys.stderr)
        return 2
    device = hardware.pick_device(None)
    dtype = hardware.pick_compute_dtype(device)
    tokenizer = loading.load_tokenizer(args.model)
    _, held_out = split_rows(load_rows(args.dataset))
    rows = held_out.select(range(min(args.rows, len(held_out))))
    examples = [encode_example(tokenizer, row["instruction"], row.get("input") or "", row["output"]) for row in rows]

    trained = training_model(args.model, args.adapter, device, dtype)
    generating = Generator.load(args.model, args.adapter).model
    float_base = load_base(args.model, device)
    load_adapter(float_base, args.adapter)
    training_vs_generation, nf4_vs_float = Agreement(), Agreement()
    for example in tqdm(examples, desc="comparing", unit="row"):
        generated = answer_logits(generating, example, device, dtype, under_autocast=False)
        training_vs_generation.add(answer_logits(trained, example, device, dtype, under_autocast=True), generated)
        nf4_vs_float.add(generated, answer_logits(float_base, example, device, dtype, under_autocast=False))

    print(f"{args.adapter} on {len(examples)} held-out rows, {device} {hardware.dtype_name(dtype)}:")
    print("| compared | answer positions | max abs logit difference | same top token | loss per answer token |")
    print("|---|---|---|---|---|")
    for label, result in (("training's forward (NF4 layers, autocast) vs generation's", training_vs_generation),
                          ("generation on the NF4 base vs on the float base", nf4_vs_float)):
        first, second = result.mean_losses()
        print(f"| {label} | {result.positions} | {result.max_difference:.4f} | {100 * result.same_top_share:.2f}% | "
              f"{first:.4f} vs {second:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

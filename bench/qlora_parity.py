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


def answer_logits(model: torch.nn.Module, examples: list[dict], device: torch.device, dtype: torch.dtype,
                  under_autocast: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: float32 logits of the positions that predict an answer token, and those tokens."""
    results = []
    with torch.inference_mode(), autocast(device, dtype if under_autocast else torch.float32):
        for example in examples:
            ids = torch.tensor([example["input_ids"]], device=device)
            labels = torch.tensor(example["labels"][1:], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            answer = labels != IGNORE_INDEX
            results.append((logits[answer], labels[answer]))
    return results


def compare(first: list, second: list) -> dict[str, float]:
    """Largest logit difference, share of positions with the same top token, and each side's mean loss."""
    max_difference, same_top, positions, losses = 0.0, 0, 0, [0.0, 0.0]
    for (logits_a, targets), (logits_b, _) in zip(first, second):
        max_difference = max(max_difference, float((logits_a - logits_b).abs().max()))
        same_top += int((logits_a.argmax(-1) == logits_b.argmax(-1)).sum())
        positions += len(targets)
        for side, logits in enumerate((logits_a, logits_b)):
            losses[side] += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    return {"max_abs_logit_difference": max_difference, "same_top_token": same_top / positions,
            "loss_first": losses[0] / positions, "loss_second": losses[1] / positions, "positions": positions}


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

    trained = answer_logits(training_model(args.model, args.adapter, device, dtype), examples, device, dtype, True)
    generating = Generator.load(args.model, args.adapter).model
    generated = answer_logits(generating, examples, device, dtype, False)
    float_base = load_base(args.model, device)
    load_adapter(float_base, args.adapter)
    on_float = answer_logits(float_base, examples, device, dtype, False)

    print(f"{args.adapter} on {len(examples)} held-out rows, {device} {hardware.dtype_name(dtype)}:")
    print("| compared | answer positions | max abs logit difference | same top token | loss per answer token |")
    print("|---|---|---|---|---|")
    for label, first, second in (("training's forward (NF4 layers, autocast) vs generation's", trained, generated),
                                 ("generation on the NF4 base vs on the float base", generated, on_float)):
        result = compare(first, second)
        print(f"| {label} | {result['positions']} | {result['max_abs_logit_difference']:.4f} | "
              f"{100 * result['same_top_token']:.2f}% | {result['loss_first']:.4f} vs {result['loss_second']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

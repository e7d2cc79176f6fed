"""Evaluation-style greedy generation at several batch sizes, side by side in one run: the same
held-out chat prompts, model, adapter and token limit as `make eval`; only the batch size changes.

    python -m bench.batch_size --adapter outputs/lora_r16 --batch-sizes 16,64 --prompts 64
    python -m bench.batch_size --adapter outputs/lora_r16 --batch-sizes 64 --prompts 128 --fixed-too

Prints one line per batch size (seconds, generated tokens/s, answers identical to the first line's)
and writes them as JSON with --result. `Generator.complete` lets a batch shrink as its rows end;
--fixed-too also times each batch generated in one piece (how it was before: finished rows padded
until the batch's longest answer ends), to measure what the shrinking saves.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from bench.generation import check_result_path, held_out_prompts, load_generator, timed_completions
from common.options import COUNT, COUNTS, DEVICE
from gemma.generation import GenerationSettings, Generator
from gemma.loading import add_model_option


def measure_batch_sizes(generator: Generator, prompts: list[str], batch_sizes: list[int],
                        settings: GenerationSettings, fixed_too: bool = False) -> list[dict]:
    generator.complete(prompts[:1], GenerationSettings(max_new_tokens=2))  # first-call set-up, untimed
    ways = {"shrinking": generator.complete}
    if fixed_too:
        ways["fixed"] = partial(generator.complete, shrink=False)
    results, first_texts = [], None
    for batch_size in batch_sizes:
        for way, complete in ways.items():
            record, texts = timed_completions(generator, lambda: complete(prompts, settings, batch_size), first_texts)
            first_texts = first_texts or texts
            results.append({"batch_size": batch_size, "batches": way, "prompts": len(prompts), **record})
            print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(parser)
    parser.add_argument("--adapter", help="adapter folder (a QLoRA one meets its NF4 base, as in make eval)")
    parser.add_argument("--dataset", default="default", help="where the held-out prompts come from")
    parser.add_argument("--prompts", type=COUNT, default=64, help="held-out prompts (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=COUNTS, default="16,64", help="comma-separated (default: 16,64)")
    parser.add_argument("--max-new-tokens", type=COUNT, default=GenerationSettings.max_new_tokens,
                        help="generation limit (default: %(default)s)")
    parser.add_argument("--device", type=DEVICE, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--fixed-too", action="store_true",
                        help="also time each batch generated in one piece, without the shrinking")
    parser.add_argument("--result", help="JSON file for the measurements")
    args = parser.parse_args(argv)
    check_result_path(parser, args.result)
    generator = load_generator(parser, args)
    prompts = held_out_prompts(args.dataset, args.prompts)
    results = measure_batch_sizes(generator, prompts, args.batch_sizes, GenerationSettings(args.max_new_tokens),
                                  args.fixed_too)
    if args.result:
        Path(args.result).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

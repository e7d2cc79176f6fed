"""The output head's product in its two layouts, side by side in one run.

    python -m bench.head_layout [--model embedded] [--rows 16,64,256] [--generation-rounds 2]

Row-major, `hidden @ weight.T` ([rows, vocabulary]), is what `nn.Linear` computes; vocabulary-major,
`weight @ hidden.T` ([vocabulary, rows]), is what the training loss (training/loss.py) computes, and the
generator's head on the CPU (generation.VocabularyMajorHead). The same products, so only the speed may
differ; it does by BLAS library, dtype, machine and workload, which is why this measures it. First the
bare products with the model's own head weight in the compute dtype, at the rows a decoding step
multiplies (one per answer in a batch: 16, 64) and a loss chunk (256); then greedy generation on
held-out prompts with each head in turn, alternating (`--generation-rounds` pairs): seconds, generated
tokens/s and how many answers are identical. Full batches by default, unlike make eval's shrinking ones
(docs/benchmarks.md): --max-new-tokens and --prompts bring it closer.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.generation import check_result_path, held_out_prompts, load_generator, timed, timed_completions
from bench.measure import machine_description
from common import hardware
from common.options import COUNT, COUNTS, DEVICE, NON_NEGATIVE_INT
from gemma.generation import GenerationSettings, Generator, RowMajorHead, VocabularyMajorHead
from gemma.loading import add_model_option


def median_seconds(device: torch.device, work, repeats: int) -> float:
    work()  # untimed: first-call set-up
    return statistics.median(timed(device, work)[1] for _ in range(repeats))


def measure_products(weight: torch.Tensor, row_counts: list[int], repeats: int) -> list[dict]:
    vocabulary, width = weight.shape
    results = []
    for rows in row_counts:
        hidden = torch.randn(rows, width, dtype=weight.dtype, device=weight.device)
        row_major = median_seconds(weight.device, lambda: hidden @ weight.T, repeats)
        vocabulary_major = median_seconds(weight.device, lambda: weight @ hidden.T, repeats)
        difference = ((hidden @ weight.T) - (weight @ hidden.T).T).abs().max().item()
        flops = 2 * rows * width * vocabulary
        results.append({"rows": rows, "row_major_ms": round(row_major * 1e3, 1),
                        "vocabulary_major_ms": round(vocabulary_major * 1e3, 1),
                        "row_major_gflops": round(flops / row_major / 1e9, 1),
                        "vocabulary_major_gflops": round(flops / vocabulary_major / 1e9, 1),
                        "speed_up": round(row_major / vocabulary_major, 2), "max_abs_difference": difference})
        print(json.dumps(results[-1]), flush=True)
    return results


def measure_generation(generator: Generator, prompts: list[str], settings: GenerationSettings, batch_size: int,
                       rounds: int) -> list[dict]:
    """Greedy generation with each head in turn; the model has no trainable-token head here (no adapter)."""
    own = generator.model.get_output_embeddings()  # the generator's choice, put back at the end
    heads = {"row-major": RowMajorHead(own.linear), "vocabulary-major": VocabularyMajorHead(own.linear)}
    generator.complete(prompts[:1], GenerationSettings(max_new_tokens=2))  # first-call set-up, untimed
    results, first_texts = [], None
    for round_ in range(rounds):
        for layout, head in heads.items():
            generator.model.set_output_embeddings(head)
            record, texts = timed_completions(generator, lambda: generator.complete(prompts, settings, batch_size),
                                              first_texts)
            first_texts = first_texts or texts
            results.append({"round": round_ + 1, "head": layout, "prompts": len(prompts), "batch_size": batch_size,
                            **record})
            print(json.dumps(results[-1]), flush=True)
    generator.model.set_output_embeddings(own)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(parser)
    parser.add_argument("--device", type=DEVICE, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--rows", type=COUNTS, default="16,64,256", help="rows per product (default: 16,64,256)")
    parser.add_argument("--repeats", type=COUNT, default=5, help="timed products per shape; the median is "
                        "reported (default: %(default)s)")
    parser.add_argument("--dataset", default="default", help="where the held-out prompts come from")
    parser.add_argument("--prompts", type=COUNT, default=64, help="held-out prompts to complete (default: %(default)s)")
    parser.add_argument("--batch-size", type=COUNT, default=64, help="as make eval's (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=COUNT, default=96, help="(default: %(default)s)")
    parser.add_argument("--generation-rounds", type=NON_NEGATIVE_INT, default=2,
                        help="pairs of generations, one per head, alternating; 0 skips them (default: %(default)s)")
    parser.add_argument("--result", help="JSON file for the measurements")
    args = parser.parse_args(argv)
    check_result_path(parser, args.result)
    generator = load_generator(parser, args)
    weight = generator.model.get_output_embeddings().weight
    print(f"{machine_description(weight.device)}; {hardware.describe_compute(weight.device, weight.dtype)}; "
          f"head {tuple(weight.shape)}", flush=True)
    results = {"products": measure_products(weight.detach(), args.rows, args.repeats)}
    if args.generation_rounds:
        prompts = held_out_prompts(args.dataset, args.prompts)
        results["generation"] = measure_generation(generator, prompts, GenerationSettings(args.max_new_tokens),
                                                   args.batch_size, args.generation_rounds)
    if args.result:
        Path(args.result).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

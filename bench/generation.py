"""Greedy generation: our batched generation.Generator against Hugging Face `generate` called one
prompt at a time (how the study generated: 9.3 s per sample on an A100), on the same model and
held-out prompts, with the same stop tokens and new-token limit.

    python -m bench.generation --settings '{"model": "embedded", ...}' --prompts 16 --result out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from bench.measure import synchronize
from bench.training import BenchSettings
from common.files import FileError, check_writable
from data.dataset import load_rows, split_rows
from gemma.chat_format import user_turn
from gemma.generation import GenerationSettings, Generator
from gemma.loading import ModelLoadError
from lora import AdapterError


def held_out_instructions(dataset: str, count: int) -> list[tuple[str, str]]:
    """(instruction, input) of the first `count` held-out rows."""
    _, test_rows = split_rows(load_rows(dataset))
    rows = test_rows.select(range(min(count, len(test_rows))))
    return [(row["instruction"], row.get("input") or "") for row in rows]


def held_out_prompts(dataset: str, count: int) -> list[str]:
    return [user_turn(instruction, input) for instruction, input in held_out_instructions(dataset, count)]


def load_generator(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Generator:
    """args.model with args.adapter (if the command has one) on args.device; a bad model or adapter is the
    parser's one-line error."""
    try:
        return Generator.load(args.model, getattr(args, "adapter", None), args.device)
    except (ModelLoadError, AdapterError) as error:
        parser.error(str(error))


def check_result_path(parser: argparse.ArgumentParser, path: str | None) -> None:
    """A --result file that cannot be written is the parser's one-line error, before any measuring."""
    if path:
        try:
            check_writable(Path(path))
        except FileError as error:
            parser.error(str(error))


def timed(device: torch.device, work):
    """(result of work(), seconds it took)."""
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - started


def timed_completions(generator: Generator, complete, first_texts: list[str] | None) -> tuple[dict, list[str]]:
    """Time `complete()` (a list of completions): seconds, new tokens, tokens/s and how many answers are
    identical to `first_texts` (the first timed run's, or these if None), and these answers' texts."""
    completions, seconds = timed(generator.model.device, complete)
    texts = [completion.text for completion in completions]
    new_tokens = sum(completion.new_tokens for completion in completions)
    record = {"seconds": round(seconds, 1), "new_tokens": new_tokens, "tokens_per_s": round(new_tokens / seconds, 1),
              "identical_to_first": sum(a == b for a, b in zip(texts, first_texts or texts))}
    return record, texts


def one_at_a_time(generator: Generator, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Plain Hugging Face `generate`, one prompt per call; the new token ids of each."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None,
                              temperature=None, eos_token_id=generator.stop_ids,
                              pad_token_id=generator.tokenizer.pad_token_id)
    completions = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = generator.tokenizer(prompt, return_tensors="pt").to(generator.model.device)
            output = generator.model.generate(**inputs, generation_config=config)
            completions.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    return completions


def measure_generation(settings: BenchSettings, prompt_count: int, max_new_tokens: int, batch_size: int) -> dict:
    generator = Generator.load(settings.model, device=settings.device)
    device = generator.model.device
    prompts = held_out_prompts(settings.dataset, prompt_count)
    generation = GenerationSettings(max_new_tokens=max_new_tokens)
    generator.complete(prompts[:1], GenerationSettings(max_new_tokens=2))  # first-call set-up, untimed
    batched, batched_seconds = timed(device, lambda: generator.complete(prompts, generation, batch_size))
    single_ids, single_seconds = timed(device, lambda: one_at_a_time(generator, prompts, max_new_tokens))
    single = [generator.to_completion(ids) for ids in single_ids]  # read as the batched ones are
    return {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "batched_seconds": batched_seconds, "batched_new_tokens": sum(c.new_tokens for c in batched),
        "single_seconds": single_seconds, "single_new_tokens": sum(c.new_tokens for c in single),
        "identical_completions": sum(b.text == s.text for b, s in zip(batched, single)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="BenchSettings as JSON (model, dataset, device)")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts to complete")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--result", required=True, help="JSON file to write the measurements to")
    args = parser.parse_args(argv)
    settings = BenchSettings(**json.loads(args.settings))
    result = measure_generation(settings, args.prompts, args.max_new_tokens, args.batch_size)
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

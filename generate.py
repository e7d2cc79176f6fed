"""Write Python code from a plain-English instruction with the base model or a LoRA adapter.

    python generate.py --prompt "Write a function to calculate fibonacci numbers"
    python generate.py --adapter outputs/lora_r16 --interactive
    python generate.py --adapter outputs/lora_r16 --input prompts.jsonl --output answers.jsonl

The instruction is wrapped in a Gemma user turn; the model answers in its own turn and generation
stops at `<end_of_turn>` (or EOS). Only the new tokens are read, and the code is extracted from them:
the fenced block if there is one, otherwise the text without the prose before or after it and
without any turn the model goes on to invent. Decoding is greedy unless --temperature is set.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.files import FileError, check_writable, read_jsonl, write_jsonl
from common.options import COUNT, DEVICE, NON_NEGATIVE, PROBABILITY, SEED
from gemma.chat_format import extract_code, user_turn
from gemma.generation import GenerateError, GenerationSettings, Generator, add_anti_repetition_options
from gemma.loading import ModelLoadError, add_model_option
from lora import AdapterError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.input) != bool(args.output):
        parser.error("--input and --output go together")
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.repetition_penalty,
                                  args.no_repeat_ngram)
    try:
        if args.output:
            check_writable(Path(args.output))  # before the slow generation
        requests = _read_requests(Path(args.input)) if args.input else None
        generator = Generator.load(args.model, args.adapter, args.device)
        if requests is not None:
            _run_batch(generator, requests, Path(args.output), settings, args.batch_size)
        elif args.interactive:
            _repl(generator, settings)
        else:
            _answer(generator, args.prompt, settings, show_raw=args.raw)
    except (ModelLoadError, AdapterError, GenerateError, FileError, OSError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nOn a terminal the answer is streamed as it is generated, then its code is shown.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--prompt", help="one instruction, e.g. 'Write a function to calculate fibonacci numbers'")
    task.add_argument("--interactive", action="store_true", help="ask for instructions one after another")
    task.add_argument("--input", metavar="PROMPTS.jsonl",
                      help="batch mode: one JSON object per line with 'instruction' (and optional 'input'), "
                           "or 'prompt' for raw text sent without a chat turn; other fields are copied")
    parser.add_argument("--output", metavar="OUT.jsonl", help="batch mode: where to write the answers "
                        "(each input line plus 'response', 'code' and 'new_tokens')")
    add_model_option(parser)
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder (ours or written by PEFT)")
    parser.add_argument("--max-new-tokens", type=COUNT, default=GenerationSettings.max_new_tokens,
                        help="answer length limit (default: %(default)s)")
    parser.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 (the default) decodes greedily")
    parser.add_argument("--top-p", type=PROBABILITY, default=1.0,
                        help="nucleus sampling, with --temperature (default: %(default)s)")
    parser.add_argument("--seed", type=SEED, default=0, help="random seed for sampling (default: %(default)s)")
    add_anti_repetition_options(parser)
    parser.add_argument("--batch-size", type=COUNT, default=16,
                        help="prompts generated together in batch mode (default: %(default)s)")
    parser.add_argument("--device", type=DEVICE, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--raw", action="store_true", help="print the whole answer, not only the code")
    return parser


def _answer(generator: Generator, instruction: str, settings: GenerationSettings, show_raw: bool = False) -> None:
    prompt = user_turn(instruction)
    if sys.stdout.isatty():
        completion = generator.stream(prompt, settings)
        code = extract_code(completion.text)
        if code != completion.text.strip():
            print(f"--- extracted code ---\n{code}")
        return
    completion = generator.complete([prompt], settings)[0]
    print(completion.text if show_raw else extract_code(completion.text))


def _repl(generator: Generator, settings: GenerationSettings) -> None:
    print("Describe the Python code you want; an empty line or Ctrl-D quits.")
    while True:
        try:
            instruction = input("\n>>> ").strip()
        except EOFError:
            break
        if not instruction:
            break
        _answer(generator, instruction, settings)


def _read_requests(path: Path) -> list[dict]:
    """The JSON objects of a prompts file, each with a 'prompt' ready for the model."""
    return [_request(record, where) for where, record in read_jsonl(path, "prompts")]


def _request(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise GenerateError(f"{where}: not a JSON object")
    if isinstance(record.get("instruction"), str):
        return {**record, "prompt": user_turn(record["instruction"], str(record.get("input") or ""))}
    if isinstance(record.get("prompt"), str):
        return record
    raise GenerateError(f"{where}: needs an 'instruction' or a 'prompt' string")


def _run_batch(generator: Generator, requests: list[dict], output: Path, settings: GenerationSettings,
               batch_size: int) -> None:
    started = time.perf_counter()
    completions = generator.complete([request["prompt"] for request in requests], settings, batch_size)
    elapsed = time.perf_counter() - started
    records = [{**request, "response": completion.text, "code": extract_code(completion.text),
                "new_tokens": completion.new_tokens} for request, completion in zip(requests, completions)]
    write_jsonl(output, records)
    generated = sum(completion.new_tokens for completion in completions)
    print(f"wrote {len(records)} answers to {output}: {generated} tokens in {elapsed:.1f} s "
          f"({generated / elapsed:.1f} generated tokens/s)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

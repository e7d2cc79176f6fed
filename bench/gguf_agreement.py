"""Does llama.cpp run an exported GGUF as we run the merged model? (`make gguf-check`)

    python -m bench.gguf_agreement                          # outputs/lora_r16 on the embedded model
    python -m bench.gguf_agreement --adapter DIR --prompts 10 --tokens 32

Exports the adapter with `export.py --gguf` at f16 and q8_0, loads each file with llama.cpp
(llama-cpp-python, requirements-gguf.txt) and, on the first held-out rows of the corpus, compares with
greedy decoding of the merged model in float32 by transformers:
- the prompt's tokens (llama.cpp's tokenizer against ours),
- the first --tokens greedy tokens from the same prompt ids,
- where each answer stops (up to --max-new-tokens): llama.cpp should stop at <end_of_turn> where we do,
- the answer of llama.cpp's own chat completion, formatted by the GGUF's chat template,
and reads the f16 file back with transformers' GGUF loader to compare its logits with the merged model's.
Writes a Markdown report (command, machine, date, file sizes, figures) and exits 1 if fewer than
--require prompts agree at f16.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.measure import machine_description
from common.options import COUNT
from data.dataset import load_rows, split_rows
from gemma import loading
from gemma.chat_format import END_OF_TURN, user_turn
from lora import load_adapter, merge_into_plain_linears

OUTTYPES = ("f16", "q8_0")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Answer:
    tokens: list[int]  # generated, the stop token included
    stop: str  # the stop token's text, or "token limit"


def held_out_rows(count: int) -> list[dict]:
    _, test_split = split_rows(load_rows("default"))
    return [test_split[index] for index in range(min(count, len(test_split)))]


def merged_model(model_name: str, adapter: str) -> torch.nn.Module:
    model = loading.load_model(model_name, torch.device("cpu"), torch.float32)
    load_adapter(model, adapter)
    merge_into_plain_linears(model, torch.float32)
    return model


def ours(model, tokenizer, prompt_ids: list[int], end_ids: set[int], max_new_tokens: int) -> Answer:
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=sorted(end_ids), pad_token_id=tokenizer.pad_token_id)
    return _answer(output[0, len(prompt_ids):].tolist(), tokenizer, end_ids)


def llama_cpp_answer(llm, tokenizer, prompt_ids: list[int], end_ids: set[int], max_new_tokens: int) -> Answer:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens: list[int] = []
    llm.reset()
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        tokens.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(tokens) == max_new_tokens:
            break
    return _answer(tokens, tokenizer, end_ids)


def _answer(tokens: list[int], tokenizer, end_ids: set[int]) -> Answer:
    ended = bool(tokens) and tokens[-1] in end_ids
    return Answer(tokens, tokenizer.convert_ids_to_tokens(tokens[-1]) if ended else "token limit")


def logits_difference(model, gguf_path: Path, prompts: list[list[int]]) -> tuple[float, float, float]:
    """(max |difference|, max |logit| of the merged model, share of positions with the same argmax)
    between the merged model and the GGUF file read back by transformers."""
    reloaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                    dtype=torch.float32).eval()
    worst, scale, same, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in prompts:
            expected = model(torch.tensor([ids])).logits[0]
            got = reloaded(torch.tensor([ids])).logits[0]
            worst = max(worst, (got - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
            same += (got.argmax(-1) == expected.argmax(-1)).sum().item()
            positions += len(ids)
    return worst, scale, same / positions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="outputs/lora_r16", help="adapter to export (default: %(default)s)")
    loading.add_model_option(parser)
    parser.add_argument("--prompts", type=COUNT, default=10, help="held-out rows to compare on (default: 10)")
    parser.add_argument("--tokens", type=COUNT, default=32, help="greedy tokens that must agree (default: 32)")
    parser.add_argument("--max-new-tokens", type=COUNT, default=512, help="where an answer is cut (default: 512)")
    parser.add_argument("--require", type=COUNT, default=8, help="prompts that must agree at f16 (default: 8)")
    parser.add_argument("--report", default="results/gguf_export/README.md", help="Markdown report to write")
    args = parser.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("error: llama-cpp-python is not installed: make gguf-check installs it (requirements-gguf.txt)",
              file=sys.stderr)
        return 2

    tokenizer = loading.load_tokenizer(args.model)
    end_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN),
               tokenizer.convert_tokens_to_ids("<start_of_turn>")}
    rows = held_out_rows(args.prompts)
    prompts = [user_turn(row["instruction"], row["input"]) for row in rows]
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    model = merged_model(args.model, args.adapter)
    reference = [ours(model, tokenizer, ids, end_ids, args.max_new_tokens) for ids in prompt_ids]

    lines, f16_agree = [], 0
    with tempfile.TemporaryDirectory() as scratch:
        files = {}
        for outtype in OUTTYPES:
            out = Path(scratch) / outtype
            command = [sys.executable, "export.py", str(Path(args.adapter).resolve()), str(out),
                       "--model", args.model, "--gguf", "--outtype", outtype]
            if subprocess.run(command, cwd=ROOT).returncode != 0:
                return 1
            files[outtype] = out / f"model-{outtype}.gguf"
        for outtype, path in files.items():
            llm = Llama(model_path=str(path), n_ctx=2048, n_threads=torch.get_num_threads(), seed=0, verbose=False)
            try:
                same_prompt = sum(llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
                                  for prompt, ids in zip(prompts, prompt_ids))
                answers = [llama_cpp_answer(llm, tokenizer, ids, end_ids, args.max_new_tokens) for ids in prompt_ids]
                chats = [llm.create_chat_completion([{"role": "user", "content": prompt_text(row)}], temperature=0.0,
                                                    top_k=1, repeat_penalty=1.0, max_tokens=args.max_new_tokens)
                         for row in rows]
            finally:
                llm.close()
            agree = sum(a.tokens[:args.tokens] == r.tokens[:args.tokens] for a, r in zip(answers, reference))
            whole = sum(a.tokens == r.tokens for a, r in zip(answers, reference))
            ended = sum(a.stop == END_OF_TURN for a in answers)
            ended_alike = sum(a.stop == r.stop for a, r in zip(answers, reference))
            chat_same = sum(chat["choices"][0]["message"]["content"] == tokenizer.decode(r.tokens, skip_special_tokens=True)
                            and chat["choices"][0]["finish_reason"] == "stop"
                            for chat, r in zip(chats, reference) if r.stop == END_OF_TURN)
            if outtype == "f16":
                f16_agree = agree
            size = path.stat().st_size / 2**20
            lines.append(f"| {outtype} | {size:,.0f} MiB | {same_prompt}/{len(prompts)} | {agree}/{len(prompts)} | "
                         f"{whole}/{len(prompts)} | {ended}/{len(prompts)} ({ended_alike} as ours) | "
                         f"{chat_same}/{sum(r.stop == END_OF_TURN for r in reference)} |")
        worst, scale, argmax_share = logits_difference(model, files["f16"], prompt_ids)

    ours_ended = sum(r.stop == END_OF_TURN for r in reference)
    report = "\n".join([
        "# GGUF export: llama.cpp against the merged model",
        "",
        f"Command: `python -m bench.gguf_agreement {shlex.join(argv if argv is not None else sys.argv[1:])}` "
        f"(`make gguf-check`)  ",
        f"Adapter: `{args.adapter}` on `{args.model}`; {len(prompts)} held-out rows; llama-cpp-python "
        f"{_llama_cpp_version()}  ",
        f"Machine: {machine_description(torch.device('cpu'))}  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        f"Ours: the merged model in float32 (transformers, greedy, up to {args.max_new_tokens} new tokens) ended "
        f"{ours_ended}/{len(prompts)} answers at {END_OF_TURN}.",
        "",
        f"| GGUF | file | same prompt tokens | same first {args.tokens} tokens | same whole answer | "
        f"llama.cpp ended at {END_OF_TURN} | chat completion = our answer |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"transformers' GGUF loader reading the f16 file back: logits differ from the merged model's by at most "
        f"{worst:.4f} (the largest logit is {scale:.1f}); the same top token at {argmax_share:.1%} of "
        f"{sum(len(ids) for ids in prompt_ids)} prompt positions.",
        "",
    ])
    path = Path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(report)
    return 0 if f16_agree >= args.require else 1


def prompt_text(row: dict) -> str:
    """The user message whose chat prompt is user_turn(instruction, input)."""
    return f"{row['instruction']}\n{row['input']}" if row["input"] else row["instruction"]


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


if __name__ == "__main__":
    sys.exit(main())

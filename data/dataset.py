"""Training data: loading Alpaca-style rows, chat-format tokens with label masking, the split, batching.

Rows have string fields `instruction`, `output` and optionally `input`, whatever the source: the embedded
corpus ("default"), a Hugging Face dataset id, or local .json / .jsonl / .parquet files. Every example is

    <bos><start_of_turn>user\\n{instruction}[\\n{input}]<end_of_turn>\\n<start_of_turn>model\\n{output}<end_of_turn>

and only the response and its closing <end_of_turn> carry labels, so the model learns the answer and
when to stop, never the prompt.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from common.files import first_line
from gemma.chat_format import END_OF_TURN, user_turn

DEFAULT_DATASET = Path(__file__).resolve().parent / "python_pairs.parquet"
IGNORE_INDEX = -100  # label of tokens that carry no loss
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Names ending like these are files the user meant, never Hugging Face ids (so no slow hub lookup).
FILE_SUFFIXES = {*LOCAL_FORMATS, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip"}
BATCHES_PER_CHUNK = 50  # batch_order sorts by length within chunks of this many batches


class DataError(ValueError):
    """Training data that cannot be used; the message is one line meant for the user."""


# ---------------------------------------------------------------- loading

def load_rows(spec: str | Path) -> datasets.Dataset:
    """Rows with string columns instruction, input ("" where absent) and output, plus any others."""
    rows = _load(spec)
    if len(rows) == 0:
        raise DataError(f"dataset {spec} has no rows")
    missing = [name for name in ("instruction", "output") if name not in rows.column_names]
    if missing:
        raise DataError(f"dataset {spec} has no {' / '.join(missing)} field (columns: {', '.join(rows.column_names)})")
    if "input" not in rows.column_names:
        rows = rows.add_column("input", [""] * len(rows))
    for name in ("instruction", "input", "output"):
        dtype = getattr(rows.features[name], "dtype", None)
        if dtype not in ("string", "large_string", "null"):
            raise DataError(f"dataset {spec}: field {name} holds {rows.features[name]}, not text")
    empty = sum(1 for i, o in zip(rows["instruction"], rows["output"]) if not i or not o)
    if empty:
        raise DataError(f"dataset {spec}: {empty} rows have an empty or missing instruction or output")
    if None in rows["input"]:
        rows = rows.map(lambda row: {"input": row["input"] or ""})
    return rows


def _load(spec: str | Path) -> datasets.Dataset:
    path = DEFAULT_DATASET if str(spec) == "default" else Path(spec).expanduser()
    if path.exists():
        return _load_local(path)
    if isinstance(spec, Path) or _looks_like_path(str(spec)):
        raise DataError(f"dataset file not found: {spec}")
    try:
        return datasets.load_dataset(str(spec), split="train")
    except Exception as error:  # the hub raises many kinds; the user needs one line either way
        raise DataError(f"could not load dataset {spec!r} from the Hugging Face hub: {first_line(error)}") from error


def _looks_like_path(spec: str) -> bool:
    """A Hugging Face id is "name" or "owner/name"; anything else the user typed is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec or Path(spec).suffix in FILE_SUFFIXES


def _load_local(path: Path) -> datasets.Dataset:
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .json, .jsonl or .parquet files in {path}")
    kinds = {LOCAL_FORMATS.get(p.suffix) for p in files}
    if None in kinds:
        raise DataError(f"unsupported dataset file {path}: use .json, .jsonl or .parquet")
    if len(kinds) > 1:
        raise DataError(f"{path} mixes JSON and Parquet files; keep one format per folder")
    if any(p.stat().st_size == 0 for p in files):
        raise DataError(f"dataset file is empty: {next(p for p in files if p.stat().st_size == 0)}")
    try:
        return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    except Exception as error:  # malformed JSON / Parquet surfaces as several exception types
        raise DataError(f"could not read {path}: {first_line(error)}") from error


# ---------------------------------------------------------------- split

def split_rows(rows: datasets.Dataset, test_size: float = 0.1, seed: int = 42) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test). Plain rows: the study's `train_test_split(test_size=0.1, seed=42)`. Rows with a
    `group` column (the embedded corpus: the source module) are split by whole groups, so functions of
    one module, which resemble each other, never sit on both sides."""
    if "group" not in rows.column_names:
        split = rows.train_test_split(test_size=test_size, seed=seed)
        return split["train"], split["test"]
    sizes: dict[str, int] = {}
    for group in rows["group"]:
        sizes[group] = sizes.get(group, 0) + 1
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target = round(test_size * len(rows))
    held_out, count = set(), 0
    for group in order:  # take shuffled groups while they fit, so one huge module cannot overshoot
        if count + sizes[group] <= target:
            held_out.add(group)
            count += sizes[group]
    test = [i for i, group in enumerate(rows["group"]) if group in held_out]
    train = [i for i, group in enumerate(rows["group"]) if group not in held_out]
    return rows.select(train), rows.select(test)


# ---------------------------------------------------------------- formatting and masking

def encode_example(tokenizer, instruction: str, input: str, output: str) -> dict:
    """{"input_ids", "labels"}: labels are -100 on BOS and the whole prompt, the ids elsewhere."""
    return _encode_batch(tokenizer, [(instruction, input, output)])[0]


def _encode_batch(tokenizer, rows: list[tuple[str, str, str]], first_row: int = 0) -> list[dict]:
    prompts = [user_turn(instruction, input) for instruction, input, _ in rows]
    texts = [prompt + output + END_OF_TURN for prompt, (_, _, output) in zip(prompts, rows)]
    prompt_ids = tokenizer(prompts)["input_ids"]
    full_ids = tokenizer(texts)["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    encoded = []
    for row, (prompt, ids) in enumerate(zip(prompt_ids, full_ids), start=first_row):
        # Masking by prompt length is only right if the prompt tokenizes the same alone and inside
        # the full text; a tokenizer that merges across the boundary would shift every label.
        if ids[: len(prompt)] != prompt or len(ids) <= len(prompt):
            raise DataError(f"row {row}: the tokenizer merges the end of the prompt with the start of the response "
                            "(does the output start with a newline?), so the prompt cannot be masked exactly")
        if ids[-1] != end_of_turn:
            raise DataError(f"the tokenizer has no single {END_OF_TURN} token; is it a Gemma tokenizer?")
        encoded.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]})
    return encoded


def encode_rows(tokenizer, rows, max_length: int, chunk: int = 256) -> tuple[list[dict], int]:
    """Encoded examples in row order, and how many rows were dropped for being longer than
    max_length tokens (cut code would teach the model to stop mid-function). `rows` is a Dataset
    or a list of dicts."""
    examples, dropped = [], 0
    with tqdm(total=len(rows), desc="tokenizing", unit="row") as progress:
        for start in range(0, len(rows), chunk):
            for example in _encode_batch(tokenizer, _triples(rows[start : start + chunk]), first_row=start):
                if len(example["input_ids"]) > max_length:
                    dropped += 1
                else:
                    examples.append(example)
            progress.update(min(chunk, len(rows) - start))
    return examples, dropped


def _triples(batch: dict[str, list] | list[dict]) -> list[tuple[str, str, str]]:
    """(instruction, input, output) of a Dataset slice (columns) or a list of row dicts."""
    rows = batch if isinstance(batch, list) else [dict(zip(batch, values)) for values in zip(*batch.values())]
    return [(row["instruction"], row.get("input") or "", row["output"]) for row in rows]


# ---------------------------------------------------------------- batching

def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of example indices grouped by length, so little compute goes to padding, yet shuffled:
    shuffle, sort within chunks of ~50 batches, cut into batches, shuffle the batches. Deterministic in
    (seed, epoch), different for each epoch; every index appears exactly once."""
    rng = random.Random(f"batch-order:{seed}:{epoch}")
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    span = batch_size * BATCHES_PER_CHUNK
    batches = []
    for start in range(0, len(indices), span):
        chunk = sorted(indices[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: padding gets pad_id, attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

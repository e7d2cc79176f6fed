"""Generations of a model (and adapter) cached on disk: keyed by the model's and the adapter's files
(its training config included: it decides whether the adapter runs on an NF4 or a float base), the device
kind and dtype they run in, the decoding code (our source files and the libraries' versions), the prompt,
the settings and the stop strings, so a rerun of an evaluation only generates what changed, and an
interrupted one keeps what it had generated."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from common.files import FileError

from gemma import loading
from gemma.generation import Completion, GenerationSettings, Generator
from lora.adapter import TRAINING_CONFIG_NAME

# The packages whose code a generation runs through: loading, the chat format, decoding, LoRA, NF4. Any
# change to their source makes cached answers stale (a comment too: cheaper than a stale score).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DECODING_SOURCES = tuple(sorted(file for package in ("common", "gemma", "lora", "quant")
                                for file in (PROJECT_ROOT / package).rglob("*.py")))


@dataclass(frozen=True)
class ModelSpec:
    label: str  # "base", or the adapter folder's name
    model: str
    adapter: Path | None = None


class GenerationCache:
    """Generations of one model + adapter, one JSON line each, appended as batches finish (an
    interrupted run keeps what it generated). Keyed by prompt, settings and stop strings."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, Completion] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        """Read the cache; a damaged line (a run interrupted mid-write, a file edited by hand) is
        dropped from the file and its generation made again, never a reason to stop."""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        kept = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                stop = record.get("stop")
                self.entries[record["key"]] = Completion(str(record["text"]), int(record["new_tokens"]),
                                                         None if stop is None else str(stop))
                kept.append(line)
            except (ValueError, KeyError, TypeError):
                print(f"{self.path} line {number} is not a cached generation: dropped, it will be generated "
                      "again", file=sys.stderr)
        cleaned = "".join(line + "\n" for line in kept)
        if cleaned != text:
            self.path.write_text(cleaned, encoding="utf-8")

    @staticmethod
    def key(prompt: str, settings: GenerationSettings, stop_strings: Sequence[str]) -> str:
        text = json.dumps([prompt, settings.as_key(), list(stop_strings)])
        return hashlib.sha256(text.encode()).hexdigest()

    def add(self, keys: Sequence[str], completions: Sequence[Completion]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for key, completion in zip(keys, completions):
                self.entries[key] = completion
                record = {"key": key, "text": completion.text, "new_tokens": completion.new_tokens,
                          "stop": completion.stop}
                handle.write(json.dumps(record) + "\n")


def cache_for(directory: Path, spec: ModelSpec, compute: str) -> GenerationCache:
    """The cache of `spec`'s generations under `directory`, named by its label and fingerprint."""
    return GenerationCache(directory / f"{spec.label}-{model_fingerprint(spec, compute)[:16]}.jsonl")


def model_fingerprint(spec: ModelSpec, compute: str) -> str:
    """Changes when the base model's files, the adapter's files or `compute` (e.g. "cpu:float32": the same
    weights greedy-decode differently in bf16 and float32) change, or the code that decodes: torch's,
    transformers' and bitsandbytes' versions (their kernels and model code round their own way) and
    DECODING_SOURCES."""
    digest = hashlib.sha256(spec.model.encode())
    digest.update(compute.encode())
    digest.update(f"torch {torch.__version__}, transformers {transformers.__version__}, "
                  f"bitsandbytes {importlib.metadata.version('bitsandbytes')}".encode())
    for source in DECODING_SOURCES:
        digest.update(source.read_bytes())
    model_path = Path(loading.resolve_model_path(spec.model))
    if model_path.is_dir():  # size and time stand for the (large) weight files
        for file in sorted(model_path.iterdir()):
            if file.is_file():
                digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    if spec.adapter:
        for file in sorted(spec.adapter.iterdir()):
            if (file.name.startswith("adapter_") or file.name == TRAINING_CONFIG_NAME) and file.is_file():
                digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


@dataclass
class GenerationStats:
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")


class KeptGenerations:
    """Answers from a generation cache kept from an earlier run, and no model: to score them again."""

    def __init__(self, path: Path, settings: GenerationSettings):
        if not path.is_file():
            raise FileError(f"{path}: no such generation cache")
        self.cache, self.settings, self.stats = GenerationCache(path), settings, GenerationStats()

    def complete(self, prompts: Sequence[str], stop_strings: Sequence[str], description: str) -> list[Completion]:
        keys = [GenerationCache.key(prompt, self.settings, stop_strings) for prompt in prompts]
        missing = sum(key not in self.cache.entries for key in keys)
        if missing:
            raise FileError(f"{self.cache.path}: no answer for {missing} of the {len(keys)} {description} prompts "
                            "(made with other settings, or for other tasks)")
        return [self.cache.entries[key] for key in keys]


class CachedGenerator:
    """Completes prompts from the cache when it can; loads the model only when it must."""

    def __init__(self, spec: ModelSpec, cache: GenerationCache, settings: GenerationSettings, batch_size: int,
                 device: str | None):
        self.spec, self.cache, self.settings = spec, cache, settings
        self.batch_size, self.device = batch_size, device
        self.generator: Generator | None = None
        self.stats = GenerationStats()

    def complete(self, prompts: Sequence[str], stop_strings: Sequence[str], description: str,
                 settings: GenerationSettings | None = None) -> list[Completion]:
        """Each prompt's completion under `settings` (default: the generator's own)."""
        settings = settings or self.settings
        keys = [GenerationCache.key(prompt, settings, stop_strings) for prompt in prompts]
        missing = [index for index, key in enumerate(keys) if key not in self.cache.entries]
        if missing:
            self._generate([prompts[index] for index in missing], [keys[index] for index in missing],
                           stop_strings, description, settings)
        return [self.cache.entries[key] for key in keys]

    def _generate(self, prompts: list[str], keys: list[str], stop_strings: Sequence[str], description: str,
                  settings: GenerationSettings) -> None:
        if self.generator is None:
            self.generator = Generator.load(self.spec.model, str(self.spec.adapter) if self.spec.adapter else None,
                                            self.device)
        with tqdm(total=len(prompts), desc=f"{self.spec.label}: {description}", unit="prompt") as progress:
            def save(batch: list[int], completions: list[Completion]) -> None:
                nonlocal new_tokens
                self.cache.add([keys[index] for index in batch], completions)
                new_tokens += sum(completion.new_tokens for completion in completions)
                progress.update(len(batch))
                progress.set_postfix(tokens_per_s=f"{new_tokens / (time.perf_counter() - started):.0f}")

            new_tokens, started = 0, time.perf_counter()
            self.generator.complete(prompts, settings, self.batch_size, stop_strings, on_batch=save)
            self.stats.new_tokens += new_tokens
            self.stats.seconds += time.perf_counter() - started

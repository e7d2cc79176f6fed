"""Generation with a base model or a LoRA adapter: prompts in, answers out, batched, with the stop
markers of Gemma's chat format, an optional streamer, and the output head laid out for speed.

The model answers in its own turn and generation stops at `<end_of_turn>` (or EOS); only the new
tokens are read. Decoding is greedy unless a temperature is set.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria,
    StoppingCriteriaList, TextStreamer,
)
from transformers.generation.streamers import BaseStreamer

from common import hardware
from common.options import NON_NEGATIVE_INT, ranged
from gemma import loading
from gemma.chat_format import STOP_MARKERS
from gemma.sampling import SAMPLER, NucleusSampler
from lora import load_adapter, read_adapter_config
from lora.adapter import trained_on_nf4


@dataclass(frozen=True)
class GenerationSettings:
    # 512 covers the answers the embedded default trains on (rows up to 512 tokens, prompt included) and
    # all but 3 of its 218 held-out references; 384 cut 16 of them (7%), correct or not.
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    # > 1 lowers the logits of tokens already in the prompt or answer (HF's CTRL-style penalty): against
    # the loops a small model falls into when decoding greedily. 1 means off.
    repetition_penalty: float = 1.0
    # n > 0 forbids repeating any n tokens in a row verbatim (HF's no_repeat_ngram_size): it breaks a
    # loop at its second pass without penalising the names that code must repeat. 0 means off.
    no_repeat_ngram: int = 0

    def as_key(self) -> dict:
        """Everything that decides what a model generates from a prompt, for caching."""
        sampling = self.temperature > 0
        key = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "stop": STOP_MARKERS,
               "top_p": self.top_p if sampling else None, "seed": self.seed if sampling else None}
        if sampling:
            key["sampler"] = SAMPLER
        if self.repetition_penalty != 1.0:  # only then, so caches made before the option stay valid
            key["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram:
            key["no_repeat_ngram"] = self.no_repeat_ngram
        return key


# What ended a completion when no stop token did (`Completion.stop`).
STOPPED_AT_LIMIT = "token limit"
STOPPED_BY_STRING = "stop string"


@dataclass(frozen=True)
class Completion:
    text: str  # the new tokens up to the first stop token, decoded, cut at the first stop string
    new_tokens: int  # positions generated, the stop token included
    # What ended it: the stop token (<end_of_turn>, <eos>, an invented <start_of_turn>, a generated <pad>),
    # STOPPED_BY_STRING or STOPPED_AT_LIMIT. None where it was not recorded (generation caches made before).
    stop: str | None = None


class GenerateError(RuntimeError):
    """Bad input for generation; the message is one line for the user."""


def load_base(model_name: str, device: torch.device, nf4: bool = False) -> PreTrainedModel:
    """The frozen base model for generation on `device`, in its fast dtype; with `nf4` quantized as QLoRA
    trained on it."""
    model = loading.load_model(model_name, device, hardware.pick_compute_dtype(device), nf4=nf4)
    if nf4 and device.type == "cpu":
        # On the CPU bitsandbytes dequantizes each 4-bit weight at every call, then multiplies: doing
        # it once gives the same numbers bit for bit (tests) without that cost at every decoding step.
        # (On CUDA its fused 4-bit kernels are fast, and the memory saving is the point.)
        from quant import dequantize_decoder_linears

        dequantize_decoder_linears(model)
    return model


class Generator:
    """A frozen model (with its adapter, if any) and its tokenizer, ready to complete prompts."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer
        _choose_head_layout(model)
        tokenizer.padding_side = "left"  # new tokens then start at the same position in every row
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = [tokenizer.eos_token_id]
        for marker in STOP_MARKERS:
            token_id = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                self.stop_ids.append(token_id)

    @property
    def end_ids(self) -> frozenset[int]:
        """Token ids after which a row generates nothing more: its stop tokens, then padding."""
        return frozenset([*self.stop_ids, self.pad_id])

    @classmethod
    def load(cls, model_name: str = loading.EMBEDDED_MODEL, adapter: str | None = None,
             device: str | None = None) -> Generator:
        """Raises loading.ModelLoadError or lora.AdapterError with a one-line message."""
        if adapter:
            read_adapter_config(adapter)  # a bad adapter folder fails before the slow model load
        # A QLoRA adapter meets the same NF4 base it was trained on.
        model = load_base(model_name, hardware.pick_device(device), nf4=bool(adapter) and trained_on_nf4(adapter))
        tokenizer = loading.load_tokenizer(model_name)
        if adapter:
            # The LoRA update stays unmerged: adding it to bf16 weights would round much of it away.
            load_adapter(model, adapter)
        return cls(model, tokenizer)

    def complete(self, prompts: Sequence[str], settings: GenerationSettings, batch_size: int = 16,
                 stop_strings: Sequence[str] = (), on_batch: Callable[[list[int], list[Completion]], None] | None = None,
                 shrink: bool = True) -> list[Completion]:
        """Complete every prompt, `batch_size` at a time, longest first (less padding per batch).
        Each batch shrinks as its rows finish (`_complete_shrinking`); `shrink=False` generates it in
        one piece instead (for `python -m bench.batch_size --fixed-too`).

        `stop_strings` end a completion early (and are cut off); `on_batch(indices, completions)`
        is called after each batch, e.g. to save progress.
        """
        lengths = [len(ids) for ids in self.tokenizer(list(prompts)).input_ids]
        order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
        completions: list[Completion | None] = [None] * len(prompts)
        complete_batch = self._complete_shrinking if shrink else self.generate_batch
        for batch in _chunks(order, batch_size):
            results = complete_batch([prompts[index] for index in batch], settings, stop_strings)
            for index, result in zip(batch, results):
                completions[index] = result
            if on_batch:
                on_batch(batch, results)
        return completions  # type: ignore[return-value]

    @torch.inference_mode()
    def _complete_shrinking(self, prompts: list[str], settings: GenerationSettings,
                            stop_strings: Sequence[str]) -> list[Completion]:
        """One batch whose finished rows leave it. A batch steps as long as its longest answer, and a
        finished row costs as much per step as a live one: in `make eval` a few answers that loop to
        the token limit kept 83% of the rows idle. So once no more than a quarter of the rows are still
        generating, the batch stops and those rows go on as a smaller batch, their prompt and answer so
        far prefilled again. Greedy answers are those of one batch, up to the rounding of another shape."""
        if settings.temperature > 0:
            torch.manual_seed(settings.seed)  # once: every part of the batch draws from one stream
        answers: list[list[int]] = [[] for _ in prompts]
        contexts = self.tokenizer(prompts).input_ids
        ends = torch.tensor(sorted(self.end_ids), device=self.model.device)  # built once, checked at every step
        live = list(range(len(prompts)))
        while live:
            budget = replace(settings, max_new_tokens=settings.max_new_tokens - len(answers[live[0]]))
            rows = [contexts[index] + answers[index] for index in live]
            until = _UntilFewAreLive(ends, keep=len(live) // 4, prompt_length=max(map(len, rows)))
            new = self._generate_ids(rows, budget, stop_strings, stopping_criteria=until)
            for index, ids in zip(live, new):
                answers[index] += ids
            live = [index for index in live if len(answers[index]) < settings.max_new_tokens
                    and not self._finished(answers[index], stop_strings)]
        return [self.to_completion(ids, stop_strings) for ids in answers]

    def _finished(self, ids: list[int], stop_strings: Sequence[str]) -> bool:
        if not self.end_ids.isdisjoint(ids):
            return True
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(stop in text for stop in stop_strings)

    def stream(self, prompt: str, settings: GenerationSettings) -> Completion:
        """Complete one prompt, printing its text to stdout as it is generated."""
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.generate_batch([prompt], settings, (), streamer)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: list[str], settings: GenerationSettings, stop_strings: Sequence[str] = (),
                       streamer: BaseStreamer | None = None,
                       stopping_criteria: StoppingCriteria | None = None) -> list[Completion]:
        """One batch, as it comes. `streamer.put` gets each step's new tokens (one per row, after the
        prompt ids); `stopping_criteria` can end rows early (True per row), e.g. a client gone away."""
        if settings.temperature > 0:
            torch.manual_seed(settings.seed)
        new = self._generate_ids(self.tokenizer(prompts).input_ids, settings, stop_strings, streamer, stopping_criteria)
        return [self.to_completion(ids, stop_strings) for ids in new]

    def _generate_ids(self, contexts: list[list[int]], settings: GenerationSettings, stop_strings: Sequence[str],
                      streamer: BaseStreamer | None = None,
                      stopping_criteria: StoppingCriteria | None = None) -> list[list[int]]:
        """Token ids in, left-padded into one batch; each row's new ids out (padded after a stop)."""
        inputs = self.tokenizer.pad({"input_ids": contexts}, return_tensors="pt").to(self.model.device)
        sampling = [NucleusSampler(settings.temperature, settings.top_p)] if settings.temperature > 0 else []
        output = self.model.generate(
            **inputs, generation_config=self._generation_config(settings, stop_strings),
            tokenizer=self.tokenizer if stop_strings else None, streamer=streamer,
            stopping_criteria=StoppingCriteriaList([stopping_criteria] if stopping_criteria else []),
            logits_processor=LogitsProcessorList(sampling),
        )
        return output[:, inputs["input_ids"].shape[1]:].tolist()

    def _generation_config(self, settings: GenerationSettings, stop_strings: Sequence[str]) -> GenerationConfig:
        # Decoding is greedy even when sampling: NucleusSampler (a custom processor: _generate_ids) draws the
        # token and leaves it the only finite logit, so transformers' own temperature, top-k and top-p stay off.
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=False,
            repetition_penalty=settings.repetition_penalty,  # HF adds no processor for 1.0
            no_repeat_ngram_size=settings.no_repeat_ngram,  # nor for 0
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            stop_strings=list(stop_strings) or None,
        )

    def to_completion(self, ids: list[int], stop_strings: Sequence[str] = ()) -> Completion:
        """Generated ids (new tokens only) -> the completion: text up to the first stop, its length and
        what stopped it."""
        # A row that finished before the rest of its batch (stop token or stop string) is padded to the
        # batch's length: it ends at its first stop token or padding. A stop token was generated, padding not.
        end_ids = self.end_ids
        ends = (position for position, token in enumerate(ids) if token in end_ids)
        end = next(ends, len(ids))
        generated = end + 1 if end < len(ids) and ids[end] in self.stop_ids else end
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        if any(stop in text for stop in stop_strings):
            stop = STOPPED_BY_STRING
            for string in stop_strings:
                text = text.split(string, 1)[0]
        elif end < len(ids):
            stop = self.tokenizer.convert_ids_to_tokens(ids[end])
        else:
            stop = STOPPED_AT_LIMIT
        return Completion(text, generated, stop)


class _UntilFewAreLive(StoppingCriteria):
    """Stops the whole batch once at most `keep` rows are still generating (a row has ended when its
    new tokens, after the left-padded prompts' `prompt_length`, hold a stop token or padding); `keep=0`
    lets the batch run until every row has ended."""

    def __init__(self, ends: torch.Tensor, keep: int, prompt_length: int):
        self.ends, self.keep, self.prompt_length = ends, keep, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        ended = torch.isin(input_ids[:, self.prompt_length:], self.ends).any(dim=1)
        stop = int((~ended).sum()) <= self.keep
        return torch.full_like(ended, stop)


class _HeadProduct(torch.nn.Module):
    """An output head that computes a linear layer's logits its own way; `weight` is the layer's (tied) weight."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight


class VocabularyMajorHead(_HeadProduct):
    """A linear output head computed as (weight @ hidden.T).T, a [vocabulary, rows] product seen as
    [rows, vocabulary]: the product of `linear(hidden)` (equal up to rounding), in the layout that CPU
    BLAS runs faster for a 262k-wide head and the few rows of a decoding step (`python -m
    bench.head_layout`; docs/benchmarks.md). The logits come out as a transposed view, which costs
    whatever reads them: `_vocabulary_major_is_faster` says where it pays. The rows are flattened into
    one 2-D product, so the view of the batch that transformers hands the head at prefill
    (`hidden_states[:, -1:, :]`) is read in place; a 3-D matmul would copy the weight for every row
    (16 x 262k x 640 bf16 = 5 GB)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        logits = (self.linear.weight @ rows.T).T
        if self.linear.bias is not None:
            logits = logits + self.linear.bias
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


class RowMajorHead(_HeadProduct):
    """`linear(hidden)` on a contiguous input: [rows, vocabulary] logits, nn.Linear's product, for where
    the vocabulary-major one is not known to be faster (GPUs). Contiguous because transformers hands the
    head a strided view of the batch at prefill (`hidden_states[:, -1:, :]`), which nn.Linear on frozen
    weights turns into a batched product that copies the weight for every row, most of a batch's time
    under torch.profiler."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.contiguous(), self.linear.weight, self.linear.bias)


def _vocabulary_major_is_faster(weight: torch.Tensor) -> bool:
    """Where greedy generation is faster with a VocabularyMajorHead: on the CPU, at make eval's 512 new
    tokens in shrinking batches (at short, full batches in bf16 it can be slower: the transposed logits
    cost more to read than the product saves; docs/benchmarks.md). GPUs are not measured, so they keep
    nn.Linear's product (RowMajorHead)."""
    return weight.device.type == "cpu"


def _choose_head_layout(model: PreTrainedModel) -> None:
    """Swap the model's linear output head (inside a head for trainable token rows, if any: one adapter's
    or several's) for a VocabularyMajorHead where that is faster, a RowMajorHead elsewhere."""
    head = model.get_output_embeddings()
    wrapped = hasattr(head, "base_layer")
    linear = head.base_layer if wrapped else head
    if isinstance(linear, _HeadProduct):
        return  # a second Generator on the same model
    chosen = VocabularyMajorHead(linear) if _vocabulary_major_is_faster(linear.weight) else RowMajorHead(linear)
    if wrapped:
        head.base_layer = chosen
    else:
        model.set_output_embeddings(chosen)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def add_anti_repetition_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repetition-penalty", type=ranged(float, 1), default=GenerationSettings.repetition_penalty,
                        help="> 1 discourages tokens already seen, against greedy loops (default: %(default)s = off)")
    parser.add_argument("--no-repeat-ngram", type=NON_NEGATIVE_INT, default=GenerationSettings.no_repeat_ngram,
                        metavar="N", help="forbid repeating any N tokens verbatim, against greedy loops "
                                          "(default: %(default)s = off)")

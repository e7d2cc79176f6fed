"""Pseudo-repetition training against greedy loops (DITTO: Xu et al. 2022, "Learning to Break the Loop").

A greedy decoder that has written a line twice tends to write it a third time, each copy more likely than
the last (the paper's self-reinforcement effect): the remaining failure of `make train`'s adapters is such
loops inside a function body. DITTO trains on answers made to loop on purpose. From a training row, keep the
prompt and the answer up to the end of a block of one to three of its lines, then repeat that block up to the
length cap. At each token of the k-th copy (k >= 2 in the paper; `--repetition-from-copy`), with p its
probability and p' the (fixed) probability of the same token one copy earlier:

    loss = -log(1 - |p - LAMBDA p'|),   LAMBDA = 0.5 (the paper's)

so each repetition should be half as likely as the one before: the model learns to leave a loop rather
than settle into it, without being told that a line may never repeat (token-level unlikelihood's bias).

Its gradient with respect to the logits is w x (softmax - one_hot) with w = -sign(p - LAMBDA p') p /
(1 - |p - LAMBDA p'|): a per-token weighted cross-entropy, which the chunked loss (training/loss.py) computes
without building the 262k-wide logits.
"""

from __future__ import annotations

import random

import torch

from data.dataset import IGNORE_INDEX, collate
from training.loss import PROBABILITY_FLOOR, decoder_hidden, loss_sum_at, target_probabilities

LAMBDA = 0.5  # each copy's target probability, relative to the copy before (the paper's)
MAX_BLOCK_LINES = 3


def newline_token_ids(tokenizer) -> frozenset[int]:
    """The ids whose text holds a line break: where a line of code ends."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, text in enumerate(texts) if "\n" in text)


def answer_lines(example: dict, newline_ids: frozenset[int]) -> list[tuple[int, int]]:
    """[start, stop) token spans of the answer's complete lines (each ends with a line-break token)."""
    labels, ids = example["labels"], example["input_ids"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    lines = []
    for i in range(start, len(ids) - 1):  # the last token is <end_of_turn>
        if ids[i] in newline_ids:
            lines.append((start, i + 1))
            start = i + 1
    return lines


def looping_example(example: dict, newline_ids: frozenset[int], max_length: int,
                    rng: random.Random, first_copy: int = 2) -> dict | None:
    """A training example whose answer loops: the prompt, the answer up to a block of 1-3 of its lines, and
    that block repeated until `max_length` (at least `first_copy` times in all). Labels cover every copy;
    "block_length" is the block's length in tokens, "penalized_from" where (in tokens from the first copy's
    start) the copies the loss applies to begin. None if no block of the answer fits `first_copy` times."""
    lines = answer_lines(example, newline_ids)
    blocks = [(lines[first][0], lines[first + size - 1][1])
              for size in range(1, MAX_BLOCK_LINES + 1) for first in range(len(lines) - size + 1)]
    blocks = [(start, stop) for start, stop in blocks if stop + (first_copy - 1) * (stop - start) <= max_length]
    if not blocks:
        return None
    start, stop = rng.choice(blocks)
    block = example["input_ids"][start:stop]
    copies = (max_length - start) // len(block)
    return {"input_ids": example["input_ids"][:start] + block * copies,
            "labels": [IGNORE_INDEX] * start + block * copies, "block_length": len(block),
            "penalized_from": (first_copy - 1) * len(block)}


def looping_batch(examples: list[dict], newline_ids: frozenset[int], max_length: int, size: int,
                  seed: str, pad_id: int, first_copy: int = 2) -> dict[str, torch.Tensor] | None:
    """Up to `size` looping examples made from `examples` (in an order drawn from `seed`, so a resumed run
    makes the same ones), the loss applying from their `first_copy`-th copy on, collated, with
    "block_length" and "penalized_from" [rows]; None if none of them yields one."""
    rng = random.Random(f"repetition:{seed}")
    order = rng.sample(range(len(examples)), len(examples))
    looping = []
    for index in order:
        if len(looping) == size:
            break
        if (made := looping_example(examples[index], newline_ids, max_length, rng, first_copy)) is not None:
            looping.append(made)
    if not looping:
        return None
    return {**collate(looping, pad_id), **{key: torch.tensor([e[key] for e in looping])
                                           for key in ("block_length", "penalized_from")}}


def repetition_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(The DITTO loss summed over the tokens of the copies from "penalized_from" on, how many such tokens).

    The returned tensor's value is the DITTO loss and its gradient DITTO's; p' is held fixed, as in the paper.
    """
    hidden = decoder_hidden(model, batch)
    targets = batch["labels"][:, 1:]
    copies = targets != IGNORE_INDEX
    found = target_probabilities(model, hidden[:, :-1][copies].detach(), targets[copies])
    p = found.new_zeros(targets.shape)
    p[copies] = found
    block = batch["block_length"].to(targets.device)[:, None]
    position = torch.arange(targets.shape[1], device=targets.device)
    first = copies.int().argmax(dim=1, keepdim=True)
    later = copies & (position >= first + batch["penalized_from"].to(targets.device)[:, None])
    earlier_p = p.gather(1, (position - block).clamp(min=0))
    gap = torch.where(later, p - LAMBDA * earlier_p, 0.0)
    rest = (1.0 - gap.abs()).clamp(min=PROBABILITY_FLOOR)
    weights = torch.where(later & (1.0 - gap.abs() >= PROBABILITY_FLOOR), -gap.sign() * p / rest, 0.0)
    value = -rest[later].log().sum()
    surrogate = loss_sum_at(model, hidden, targets, later, weights=weights)
    return surrogate - surrogate.detach() + value, int(later.sum())

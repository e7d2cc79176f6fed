"""Trainable token rows: a few rows of the frozen embedding replaced by trainable ones (PEFT's
`trainable_token_indices`), used at both ends when the output head is tied to the embedding.

    embedding(id) = rows[slot(id)] * scale    for id in token_ids   (scale: the embedding's own, e.g.
                  = base_embedding(id)        otherwise               Gemma's sqrt(hidden))
    logits[:, id] = hidden @ rows[slot(id)]   for id in token_ids, when the head is tied
                  = base_head(hidden)[:, id]  otherwise

`rows` ([n, hidden], float32) hold the full replacement rows, not differences, and start as copies of
the base rows: a fresh adapter changes nothing. They are saved as PEFT saves them, under
`<embedding path>.token_adapter.trainable_tokens_delta`. Why it matters: a pretrained checkpoint whose
chat markers were never trained has near-identical rows for them, and LoRA inside the decoder cannot
make one row of a frozen, tied head likely; training the rows themselves can.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROWS_NAME = "trainable_tokens_delta"  # PEFT's name for the rows, kept so the files match


class TokenRows(nn.Module):
    """The trainable rows for `token_ids`, owned by the embedding wrapper and shared with a tied head."""

    def __init__(self, token_ids: Sequence[int], initial_rows: torch.Tensor):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long,
                                                       device=initial_rows.device), persistent=False)
        self.trainable_tokens_delta = nn.Parameter(initial_rows.detach().float().clone())


class TrainableTokenEmbedding(nn.Module):
    """An input embedding whose rows for `token_adapter.token_ids` come from `token_adapter`."""

    def __init__(self, base_layer: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        self.base_layer = base_layer
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=base_layer.weight.device)
        self.token_adapter = TokenRows(token_ids, base_layer.weight[ids])

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base table (what transformers' helpers look for on an input embedding)."""
        return self.base_layer.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embed_with_rows(self.base_layer, self.base_layer(input_ids), input_ids, self.token_adapter)


class TrainableTokenHead(nn.Module):
    """A tied output head whose logits for the trainable tokens use the trainable rows."""

    def __init__(self, base_layer: nn.Linear, token_adapter: TokenRows):
        super().__init__()
        self.base_layer = base_layer
        # In a list, so the rows are not registered twice (they belong to the embedding wrapper).
        self._token_adapter = [token_adapter]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return logits_with_rows(self.base_layer, self.base_layer(hidden), hidden, self._token_adapter[0])


def embed_with_rows(embedding: nn.Module, embedded: torch.Tensor, input_ids: torch.Tensor,
                    rows: TokenRows) -> torch.Tensor:
    """`embedded` (the base embedding of `input_ids`) with the positions of the rows' tokens taken from them."""
    matches = input_ids.unsqueeze(-1) == rows.token_ids  # [..., n]
    # Indexing (not a one-hot matmul) keeps the rows exact under autocast.
    values = rows.trainable_tokens_delta.to(embedding.weight.dtype)[matches.int().argmax(-1)]
    scale = getattr(embedding, "embed_scale", None)
    if scale is not None:  # Gemma's scaled embedding multiplies its rows by sqrt(hidden)
        values = values * scale.to(values.dtype)
    return torch.where(matches.any(-1, keepdim=True), values.to(embedded.dtype), embedded)


def logits_with_rows(head: nn.Module, logits: torch.Tensor, hidden: torch.Tensor, rows: TokenRows) -> torch.Tensor:
    """`logits` (the base head's of `hidden`) with the rows' tokens' columns computed from the rows."""
    token_logits = F.linear(hidden, rows.trainable_tokens_delta.to(head.weight.dtype))
    return logits.index_copy(-1, rows.token_ids, token_logits.to(logits.dtype))


def inject_trainable_tokens(model: nn.Module, token_ids: Sequence[int]) -> TokenRows:
    """Make the rows of `token_ids` trainable in the input embedding and, when the output head is tied
    to it (the same weight tensor), in the head too. An untied head is left alone, as PEFT does."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, TrainableTokenEmbedding):
        raise ValueError("the model already has trainable token rows")
    token_ids = list(token_ids)
    vocabulary = embedding.weight.shape[0]
    if not token_ids or len(set(token_ids)) != len(token_ids) or not all(0 <= i < vocabulary for i in token_ids):
        raise ValueError(f"trainable token ids must be distinct and in [0, {vocabulary}), got {token_ids}")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    wrapper = TrainableTokenEmbedding(embedding, token_ids)
    model.set_input_embeddings(wrapper)
    if tied:
        model.set_output_embeddings(TrainableTokenHead(head, wrapper.token_adapter))
    return wrapper.token_adapter


def token_rows(model: nn.Module) -> tuple[str, TokenRows] | None:
    """(module path of the embedding wrapper, its rows), or None when the model has no trainable rows."""
    for name, module in model.named_modules():
        if isinstance(module, TrainableTokenEmbedding):
            return name, module.token_adapter
    return None


def output_head(model: nn.Module) -> tuple[torch.Tensor, TokenRows | None]:
    """The frozen head weight, and the rows that replace some of its rows (None if none do)."""
    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokenHead):
        return head.base_layer.weight, head._token_adapter[0]
    return head.weight, None


@torch.no_grad()
def merge_token_rows(model: nn.Module) -> None:
    """Write the trained rows into the embedding (and so into a tied head) and remove the wrappers."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, TrainableTokenEmbedding):
        return
    rows = embedding.token_adapter
    weight = embedding.base_layer.weight
    weight.index_copy_(0, rows.token_ids, rows.trainable_tokens_delta.to(weight.dtype))
    model.set_input_embeddings(embedding.base_layer)
    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokenHead):
        model.set_output_embeddings(head.base_layer)


def describe_token_rows(model: torch.nn.Module, tokenizer, token_ids: tuple[int, ...]) -> str:
    """Which rows train and what the base model has in them: a row close to the mean of the
    `<unusedN>` rows (cosine > 0.9) was never trained, which is why these rows must be."""
    weight = model.get_input_embeddings().weight.float()
    vocabulary = tokenizer.get_vocab()
    unused = [index for token, index in vocabulary.items() if token.startswith("<unused")]
    parts = []
    for token_id in token_ids:
        part = f"{tokenizer.convert_ids_to_tokens(token_id)} ({token_id})"
        if unused:
            cosine = torch.cosine_similarity(weight[token_id], weight[unused].mean(0), dim=0).item()
            verdict = "looks untrained" if cosine > 0.9 else "looks trained"
            part += f": cosine {cosine:.2f} with the mean <unused> row, {verdict}"
        parts.append(part)
    return "trainable token rows (input embedding, and the output head when tied): " + "; ".join(parts)

"""Many adapters on one frozen base model, chosen per row of a batch (serving several adapters at once).

    y[i] = base(x[i]) + s_k * B_k(A_k(x[i]))        k = the adapter of row i (slot 0: the base alone)

and likewise each row's embedding and tied-head columns for its adapter's trainable token rows. Rows are
grouped by adapter and each group goes through the same computation a single adapter's LoRALinear and
token wrappers do (lora.layer.low_rank_update, lora.tokens.embed_with_rows / logits_with_rows), so a row's
output is what its adapter alone gives. The base's weights are held once: n adapters cost one base plus
their own small tensors.

    adapters = AdapterSet(model)
    adapters.add("sql", "outputs/sql_r16")          # checked exactly as load_adapter checks one adapter
    with adapters.selected([0, 1, 1, 0]):           # rows 1 and 2 use "sql", rows 0 and 3 the base
        model.generate(...)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.modules import replace_module

from .adapter import load_adapter
from .inject import lora_layers
from .layer import low_rank_update
from .tokens import TokenRows, TrainableTokenEmbedding, TrainableTokenHead, embed_with_rows, logits_with_rows

BASE_SLOT = 0


@dataclass
class RowSlots:
    """Which adapter each row of the batch being computed uses (None: every row the base alone)."""

    slots: torch.Tensor | None = None

    def groups(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(adapter slot, the indices of its rows) for each adapter in the batch, the base's rows left out."""
        if self.slots is None:
            return
        for slot in torch.unique(self.slots).tolist():
            if slot != BASE_SLOT:
                yield slot, torch.nonzero(self.slots == slot).flatten()


class MultiLoRALinear(nn.Module):
    """A frozen linear layer with any number of LoRA updates, each applied to its own rows."""

    def __init__(self, base: nn.Module, rows: RowSlots):
        super().__init__()
        self.base = base
        self.rows = rows
        self.updates: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # slot -> (A, B, scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        for slot, rows in self.rows.groups():
            if slot in self.updates:
                mine = (result[rows] + low_rank_update(x[rows], *self.updates[slot])).to(x.dtype)
                result = result.index_copy(0, rows, mine)
        return result


class MultiTokenEmbedding(nn.Module):
    """The input embedding with each adapter's trainable token rows for its own batch rows."""

    def __init__(self, base_layer: nn.Embedding, rows: RowSlots):
        super().__init__()
        self.base_layer = base_layer
        self.rows = rows
        self.token_rows: dict[int, TokenRows] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.base_layer(input_ids)
        for slot, rows in self.rows.groups():
            if slot in self.token_rows:
                mine = embed_with_rows(self.base_layer, embedded[rows], input_ids[rows], self.token_rows[slot])
                embedded = embedded.index_copy(0, rows, mine)
        return embedded


class MultiTokenHead(nn.Module):
    """A tied output head whose trainable tokens' logits use each row's adapter's rows."""

    def __init__(self, base_layer: nn.Module, embedding: MultiTokenEmbedding):
        super().__init__()
        self.base_layer = base_layer
        self._embedding = [embedding]  # in a list: the rows belong to the embedding, registered once

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base_layer(hidden)
        embedding = self._embedding[0]
        for slot, rows in embedding.rows.groups():
            if slot in embedding.token_rows:
                mine = logits_with_rows(self.base_layer, logits[rows], hidden[rows], embedding.token_rows[slot])
                logits = logits.index_copy(0, rows, mine)
        return logits


@dataclass
class AdapterSet:
    """Adapters loaded side by side onto one base model; `selected` says which one each batch row uses."""

    model: nn.Module
    names: list[str] = field(default_factory=list)  # slot i + 1 holds names[i]
    rows: RowSlots = field(default_factory=RowSlots)
    _linears: dict[str, MultiLoRALinear] = field(default_factory=dict)
    _embedding: MultiTokenEmbedding | None = None
    _head: MultiTokenHead | None = None

    def add(self, name: str, folder: str | Path) -> int:
        """Load an adapter (raises AdapterError as load_adapter does, leaving the set as it was); its slot."""
        slot = len(self.names) + 1
        self._uninstall()
        try:
            load_adapter(self.model, folder)
            self._take_adapter(slot)
        finally:
            self._unwrap_single_adapter()
            self._install()
        self.names.append(name)
        return slot

    def adapter_bytes(self) -> int:
        """What the adapters hold: their A and B matrices and token rows."""
        sizes = [a.nbytes + b.nbytes for linear in self._linears.values() for a, b, _ in linear.updates.values()]
        if self._embedding:
            sizes += [rows.trainable_tokens_delta.nbytes for rows in self._embedding.token_rows.values()]
        return sum(sizes)

    @contextmanager
    def selected(self, slots: Sequence[int]):
        """Row i of the batches computed inside uses the adapter in slots[i] (0: the base alone)."""
        if any(not 0 <= slot <= len(self.names) for slot in slots):
            raise ValueError(f"adapter slots must be in [0, {len(self.names)}], got {list(slots)}")
        device = next(self.model.parameters()).device
        self.rows.slots = torch.tensor(list(slots), dtype=torch.long, device=device)
        try:
            yield
        finally:
            self.rows.slots = None

    def _take_adapter(self, slot: int) -> None:
        """Move the freshly loaded adapter's tensors into the multi-adapter modules."""
        for name, layer in lora_layers(self.model).items():
            if name not in self._linears:
                self._linears[name] = MultiLoRALinear(layer.base, self.rows)
            self._linears[name].updates[slot] = (layer.lora_A.weight.detach(), layer.lora_B.weight.detach(),
                                                 layer.scaling)
        embedding = self.model.get_input_embeddings()
        if isinstance(embedding, TrainableTokenEmbedding):
            if self._embedding is None:
                self._embedding = MultiTokenEmbedding(embedding.base_layer, self.rows)
                head = self.model.get_output_embeddings()
                if isinstance(head, TrainableTokenHead):
                    self._head = MultiTokenHead(head.base_layer, self._embedding)
            self._embedding.token_rows[slot] = embedding.token_adapter.requires_grad_(False)

    def _unwrap_single_adapter(self) -> None:
        """Put the plain base modules back where load_adapter wrapped them."""
        for name, layer in lora_layers(self.model).items():
            replace_module(self.model, name, layer.base)
        embedding = self.model.get_input_embeddings()
        if isinstance(embedding, TrainableTokenEmbedding):
            self.model.set_input_embeddings(embedding.base_layer)
            head = self.model.get_output_embeddings()
            if isinstance(head, TrainableTokenHead):
                self.model.set_output_embeddings(head.base_layer)

    def _install(self) -> None:
        for name, linear in self._linears.items():
            replace_module(self.model, name, linear)
        if self._embedding is not None:
            self.model.set_input_embeddings(self._embedding)
        if self._head is not None:
            self.model.set_output_embeddings(self._head)

    def _uninstall(self) -> None:
        for name, linear in self._linears.items():
            replace_module(self.model, name, linear.base)
        if self._embedding is not None:
            self.model.set_input_embeddings(self._embedding.base_layer)
        if self._head is not None:
            self.model.set_output_embeddings(self._head.base_layer)

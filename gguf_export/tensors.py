"""A merged Gemma's weights as GGUF tensors: llama.cpp's names, its norm convention, the outtype.

Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's multiplies by the weight, so every norm is
written with the 1 added. The output head is the embedding (tied), so it is not written twice.
Vectors (the norms) stay float32 in every outtype, as llama.cpp's own converter keeps them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType, get_tensor_name_map, quants

from .errors import GGUFExportError

TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Outtype:
    matrices: GGMLQuantizationType  # 2-D weights; vectors are float32
    file_type: LlamaFileType


OUTTYPES = {
    "f16": Outtype(GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": Outtype(GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": Outtype(GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}


@dataclass(frozen=True)
class EncodedTensor:
    name: str
    data: np.ndarray  # float32/float16 values, or the encoded bytes (row by row)
    kind: GGMLQuantizationType


def gguf_tensors(state: dict[str, torch.Tensor], arch, block_count: int, vocabulary_size: int,
                 outtype: Outtype) -> Iterator[EncodedTensor]:
    """Each weight of a merged (plain) model, renamed, adjusted and encoded, one at a time."""
    names = get_tensor_name_map(arch, block_count)
    for name, tensor in state.items():
        if name == TIED_HEAD:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"no GGUF name for the model's tensor {name!r}")
        values = tensor.detach().to(torch.float32)
        if name.endswith("norm.weight"):
            values = values + 1.0
        if gguf_name == "token_embd.weight":
            values = _embedding_rows(values, vocabulary_size)
        yield encode(gguf_name, values.cpu().numpy(), outtype)


def _embedding_rows(embedding: torch.Tensor, vocabulary_size: int) -> torch.Tensor:
    """llama.cpp sizes the vocabulary by the token list: rows beyond it (padding) are dropped."""
    if embedding.shape[0] < vocabulary_size:
        raise GGUFExportError(f"the tokenizer has {vocabulary_size} tokens but the embedding only "
                              f"{embedding.shape[0]} rows")
    return embedding[:vocabulary_size]


def encode(name: str, values: np.ndarray, outtype: Outtype) -> EncodedTensor:
    """Vectors as float32; matrices in the outtype (Q8_0 needs rows in blocks of 32, else float16)."""
    kind = outtype.matrices if values.ndim > 1 else GGMLQuantizationType.F32
    if kind == GGMLQuantizationType.Q8_0 and values.shape[-1] % 32:
        kind = GGMLQuantizationType.F16
    if kind == GGMLQuantizationType.F32:
        return EncodedTensor(name, values, kind)
    if kind == GGMLQuantizationType.F16:
        return EncodedTensor(name, values.astype(np.float16), kind)
    return EncodedTensor(name, quants.quantize(values, kind), kind)

"""One folder: the GGUF file (weights, hyperparameters, vocabulary, chat template) and its Modelfile."""

from __future__ import annotations

from pathlib import Path

import gguf
from torch import nn
from transformers import PreTrainedTokenizerBase

from common.files import write_folder

from .hyperparameters import add_hyperparameters, architecture_name, gguf_architecture
from .modelfile import modelfile_text
from .tensors import OUTTYPES, gguf_tensors
from .vocabulary import add_vocabulary, sentencepiece_vocabulary


def gguf_file_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def write_gguf_folder(model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path, outtype: str,
                      name: str) -> Path:
    """Write a merged (plain) Gemma as `directory`/model-OUTTYPE.gguf with a Modelfile beside it.
    The folder must not exist; it appears whole or not at all. Returns the GGUF file's path.
    Raises GGUFExportError (before writing anything) for what GGUF cannot hold."""
    config = model.config
    architecture_name(config)  # refuse an unsupported model before any work
    vocabulary = sentencepiece_vocabulary(tokenizer)

    def write(staging: Path) -> None:
        writer = gguf.GGUFWriter(staging / gguf_file_name(outtype), architecture_name(config))
        writer.add_name(name)
        add_hyperparameters(writer, config)
        writer.add_file_type(OUTTYPES[outtype].file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocabulary(writer, tokenizer, vocabulary)
        for tensor in gguf_tensors(model.state_dict(), gguf_architecture(config), config.num_hidden_layers,
                                   len(vocabulary), OUTTYPES[outtype]):
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        (staging / "Modelfile").write_text(modelfile_text(gguf_file_name(outtype)))

    write_folder(directory, write, "GGUF export")
    return directory / gguf_file_name(outtype)

"""Tiny random-init Gemma 2 / Gemma 3 models and a tiny byte-level tokenizer, built in-process.

They have the real architectures (module names, soft-capping, sliding windows, tied embeddings)
at a size that runs in milliseconds, so most tests need no downloaded weights.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma3TextConfig, Gemma3ForCausalLM, Gemma2ForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: every byte is one token, decoding is exact, and the
    special tokens sit at Gemma's ids (pad 0, eos 1, bos 2)."""
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(byte_symbols))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )


TINY_VOCAB = len(SPECIAL_TOKENS) + 256


def tiny_gemma2_config() -> Gemma2Config:
    return Gemma2Config(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, attn_implementation="eager",
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def tiny_gemma3_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=32,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def build_tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(tiny_gemma2_config())
    else:
        model = Gemma3ForCausalLM(tiny_gemma3_config())
    return model.eval()


def corpus_row(index: int) -> dict:
    """A row shaped like the embedded corpus's; every other one carries doctests."""
    return {"instruction": f"Return x plus {index}. Write it as a Python function `add{index}(x)`.", "input": "",
            "output": f"def add{index}(x):\n    return x + {index}", "entry_point": f"add{index}",
            "tests": f">>> add{index}(1)\n{index + 1}" if index % 2 else "", "group": f"module{index}"}


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture(params=["gemma2", "gemma3"])
def tiny_model(request) -> torch.nn.Module:
    return build_tiny_model(request.param)

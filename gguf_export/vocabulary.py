"""Gemma's tokenizer as GGUF metadata: llama.cpp's SentencePiece ("llama") vocabulary.

llama.cpp tokenizes a SentencePiece vocabulary by merging adjacent pieces, highest score first, and
reads each token's type: control tokens (<bos>, <end_of_turn>) only where the caller asks for special
tokens, user-defined tokens anywhere in the text, byte tokens (<0x41>) for characters no piece covers.
A Hugging Face tokenizer keeps no SentencePiece scores, but Gemma's are its pieces' ranks (-0, -1,
-2, ... in id order) and llama.cpp only compares them, so the rank rebuilt from the id gives the same
merges. Added tokens get -1000 and bytes 0, as in Gemma's own GGUF files. Gemma's runs of spaces
("▁▁", "▁▁▁", ...) are user-defined pieces in its SentencePiece model, which llama.cpp matches in the raw
text, so they are written as spaces (a Hugging Face tokenizer shows them as ordinary ▁ pieces).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGUFWriter, TokenType
from transformers import PreTrainedTokenizerBase

from gemma.chat_format import CHAT_TEMPLATE, END_OF_TURN

from .errors import GGUFExportError

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
SPACE_MARK = "\u2581"  # SentencePiece's visible space
SPACE_RUN = re.compile(f"{SPACE_MARK}{{2,}}")
ADDED_TOKEN_SCORE = -1000.0


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    scores: list[float]
    types: list[int]

    def __len__(self) -> int:
        return len(self.tokens)


def sentencepiece_vocabulary(tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
    """Every token by id with its score and type; raises GGUFExportError for a tokenizer that is not
    SentencePiece-style (pieces with ▁ for spaces and byte fallback), which is what Gemma's are."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if any(token is None for token in tokens):
        raise GGUFExportError("the tokenizer's ids have gaps; GGUF needs a token for every id")
    byte_pieces = sum(bool(BYTE_PIECE.fullmatch(token)) for token in tokens)
    if byte_pieces != 256 or not any(token.startswith(SPACE_MARK) for token in tokens):
        raise GGUFExportError("the tokenizer is not a SentencePiece tokenizer with byte fallback like Gemma's; "
                              "only those can be written to GGUF here")
    added = tokenizer.added_tokens_decoder
    scores, types, rank = [], [], 0
    for token_id, token in enumerate(tokens):
        if token_id in added:
            scores.append(ADDED_TOKEN_SCORE)
            types.append(TokenType.CONTROL if added[token_id].special else TokenType.USER_DEFINED)
        elif SPACE_RUN.fullmatch(token):
            tokens[token_id] = " " * len(token)
            scores.append(ADDED_TOKEN_SCORE)
            types.append(TokenType.USER_DEFINED)
        elif BYTE_PIECE.fullmatch(token):
            scores.append(0.0)
            types.append(TokenType.BYTE)
        else:
            scores.append(-float(rank))
            types.append(TokenType.NORMAL)
            rank += 1
    return Vocabulary(tokens, scores, [int(kind) for kind in types])


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise GGUFExportError(f"the tokenizer has no {END_OF_TURN} token, so a GGUF runtime could not end a turn")
    return token_id


def add_vocabulary(writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocabulary: Vocabulary) -> None:
    """The tokenizer.* keys: pieces, special ids, no space prefix (Gemma adds none), our chat template,
    and <end_of_turn> as the end-of-turn token, which llama.cpp treats as an end of generation."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_eot_token_id(end_of_turn_id(tokenizer))
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)

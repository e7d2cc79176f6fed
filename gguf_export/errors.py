"""The one error this package raises."""


class GGUFExportError(ValueError):
    """A model or tokenizer that GGUF (as llama.cpp reads it) cannot hold; the message is one line."""

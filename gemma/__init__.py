"""The Gemma specifics: loading a model and its tokenizer (a Hugging Face id, a folder, or the embedded
GGUF), the chat format, and generation with a base model or an adapter."""

"""`make bench`: our LoRA/QLoRA loop side by side with PEFT + Hugging Face Trainer (see __main__.py)."""

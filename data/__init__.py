"""Training data: loading, tokenizing and batching (`data.dataset`) and the embedded corpus builder."""

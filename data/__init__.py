"""Training data: the loaders and chat formatting (`data.dataset`) and the embedded corpus builder."""

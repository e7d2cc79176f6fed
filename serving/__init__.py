"""The OpenAI-compatible HTTP server: the app and the batcher that generates requests together."""

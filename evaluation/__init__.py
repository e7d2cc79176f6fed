"""Scoring models: the metrics, the cached generation of answers, the sandbox that runs them, the
report with intervals, paired tests between models, and the report on answers that loop."""

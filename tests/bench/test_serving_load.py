"""The serving load test (bench/serving_load.py) on a tiny model: every kind of request is answered as
it should be, and the server ends healthy."""

from __future__ import annotations

from bench import serving_load
from conftest import build_tiny_model, make_tiny_tokenizer


def test_good_bad_huge_and_abandoned_requests_all_end_as_they_should(tmp_path):
    build_tiny_model("gemma3").save_pretrained(tmp_path / "model")
    make_tiny_tokenizer().save_pretrained(tmp_path / "model")
    summary, held = serving_load.run(str(tmp_path / "model"), requests=60, clients=12, max_tokens=4, max_batch=8)
    assert held, summary
    assert summary.startswith("60 requests from 12 concurrent clients")
    for kind in serving_load.KINDS:
        assert f"| {kind} | 12 |" in summary
    assert "'200': 24" in summary and "'None': 12" in summary  # 12 good + 12 streamed; 12 abandoned

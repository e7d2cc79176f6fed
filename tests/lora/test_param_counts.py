"""Trainable-parameter counts of the real architectures, built on the meta device (no weights)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

from lora import LoRAConfig, count_parameters, inject_lora, trainable_report


def gemma_2_2b_config() -> Gemma2Config:
    return Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256)


def gemma_3_270m_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256)


def on_meta(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("rank, expected", [(8, 3_194_880), (16, 6_389_760), (32, 12_779_520)])
def test_gemma_2_2b_counts_match_the_study(rank, expected):
    model = on_meta(gemma_2_2b_config())
    inject_lora(model, LoRAConfig(rank=rank, alpha=2 * rank))
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == 2_614_341_888 + expected


def test_gemma_2_2b_report_line_matches_the_study():
    model = on_meta(gemma_2_2b_config())
    inject_lora(model, LoRAConfig(rank=16, alpha=32))
    assert trainable_report(model) == (
        "trainable params: 6,389,760 || all params: 2,620,731,648 || trainable%: 0.2438"
    )


def test_gemma_3_270m_rank_16():
    model = on_meta(gemma_3_270m_config())
    inject_lora(model, LoRAConfig(rank=16, alpha=32))
    assert count_parameters(model)[0] == 1_474_560

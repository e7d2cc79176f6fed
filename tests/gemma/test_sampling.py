"""Temperature and nucleus sampling: the same tokens kept as transformers' own warpers, and the same samples drawn."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from conftest import build_tiny_model, make_tiny_tokenizer
from gemma.generation import GenerationSettings, Generator
from gemma.sampling import TemperatureAndNucleus


def transformers_filter(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    ids = torch.zeros(len(scores), 1, dtype=torch.long)
    return TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, scores))


@pytest.mark.parametrize("temperature, top_p", [(0.8, 0.95), (0.2, 0.95), (1.0, 0.5), (1.5, 0.99), (0.8, 1.0)])
def test_it_keeps_the_tokens_transformers_keeps(temperature, top_p):
    torch.manual_seed(0)
    # Peaked rows (a nucleus of a few tokens), flat ones (a nucleus past the 64 candidates: the fallback) and between.
    scores = torch.randn(24, 5000) * torch.tensor([8.0] * 8 + [0.5] * 8 + [3.0] * 8).unsqueeze(1)
    ids = torch.zeros(len(scores), 1, dtype=torch.long)
    ours = TemperatureAndNucleus(temperature, top_p, candidates=64)(ids, scores.clone())
    theirs = transformers_filter(scores.clone(), temperature, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    kept = (~torch.isinf(ours)).sum(dim=1)
    if top_p < 1.0:
        assert kept.min() < 64 < kept.max()  # rows within the candidates and rows past them: both paths ran


def test_the_generator_draws_what_transformers_own_sampling_draws():
    model, tokenizer = build_tiny_model("gemma3"), make_tiny_tokenizer()
    prompt = "<start_of_turn>user\nWrite fib<end_of_turn>\n<start_of_turn>model\n"
    settings = GenerationSettings(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    ours = Generator(model, tokenizer).generate_batch([prompt], settings)[0]
    inputs = tokenizer([prompt], return_tensors="pt")
    torch.manual_seed(7)
    reference = model.generate(**inputs, do_sample=True, temperature=0.8, top_p=0.9, top_k=0, max_new_tokens=12,
                               eos_token_id=Generator(model, tokenizer).stop_ids, pad_token_id=tokenizer.pad_token_id)
    new = reference[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours.new_tokens == len(new) and ours.text == Generator(model, tokenizer).to_completion(new).text

"""Temperature and nucleus sampling: draws only the tokens transformers' own warpers keep, as often as their
probabilities say, and repeatably within generation."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from conftest import build_tiny_model, make_tiny_tokenizer
from gemma.generation import GenerationSettings, Generator
from gemma.sampling import NucleusSampler

PROMPT = "<start_of_turn>user\nWrite fib<end_of_turn>\n<start_of_turn>model\n"


def nucleus_probabilities(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution to draw from, by transformers' warpers, in float64."""
    ids = torch.zeros(len(scores), 1, dtype=torch.long)
    filtered = TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, scores))
    return filtered.double().softmax(dim=-1)


def within_five_sigma(counts: torch.Tensor, expected: torch.Tensor) -> bool:
    """Each token's count within 5 standard deviations of its expected count (binomial), the tokens expected
    fewer than 5 times pooled per row (where the normal approximation fails) and held to 5 sqrt(max(expected, 1))."""
    draws = counts.sum(dim=1, keepdim=True)
    frequent = expected >= 5
    spread = (expected * (1 - expected / draws)).sqrt()
    if ((counts - expected).abs() > 5 * spread)[frequent].any():
        return False
    rare_counts, rare_expected = (counts * ~frequent).sum(dim=1), (expected * ~frequent).sum(dim=1)
    return bool(((rare_counts - rare_expected).abs() <= 5 * rare_expected.clamp(min=1).sqrt()).all())


def test_it_returns_the_drawn_token_as_the_only_finite_logit():
    torch.manual_seed(0)
    scores = torch.randn(5, 300) * 4
    processed = NucleusSampler(0.8, 0.95)(torch.zeros(5, 1, dtype=torch.long), scores)
    assert torch.equal(torch.isfinite(processed).sum(dim=1), torch.ones(5, dtype=torch.long))
    assert processed.max(dim=1).values.eq(0).all()


@pytest.mark.parametrize("temperature, top_p", [(0.8, 0.95), (0.2, 0.95), (1.0, 0.5), (1.5, 0.99), (0.8, 1.0)])
def test_it_draws_from_the_nucleus_as_often_as_its_probabilities_say(temperature, top_p):
    torch.manual_seed(0)
    # A peaked row (a nucleus of a few tokens), a flat one (a nucleus past the 16 candidates: the fallback) and one between.
    scores = torch.randn(3, 300) * torch.tensor([[8.0], [0.3], [3.0]])
    draws = 20_000
    expected = nucleus_probabilities(scores, temperature, top_p)
    tokens = NucleusSampler(temperature, top_p, candidates=16).draw(scores.repeat_interleave(draws, dim=0))
    counts = torch.stack([row.bincount(minlength=300) for row in tokens.view(3, draws)]).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus, ever
    assert within_five_sigma(counts, draws * expected)
    kept = (expected > 0).sum(dim=1)
    if top_p < 1.0:
        assert kept.min() < 16 < kept.max()  # rows within the candidates and rows past them: both paths ran


def test_the_distribution_check_tells_two_temperatures_apart():
    # The check above must be able to fail: the same draws scored against another temperature's probabilities.
    torch.manual_seed(0)
    scores = torch.randn(1, 300) * 3
    tokens = NucleusSampler(0.8, 0.95).draw(scores.repeat(20_000, 1))
    counts = tokens.bincount(minlength=300).double().unsqueeze(0)
    assert within_five_sigma(counts, 20_000 * nucleus_probabilities(scores, 0.8, 0.95))
    assert not within_five_sigma(counts, 20_000 * nucleus_probabilities(scores, 1.0, 0.95))


def test_the_generator_repeats_a_seed_and_draws_other_answers_for_another():
    model, tokenizer = build_tiny_model("gemma3"), make_tiny_tokenizer()
    generator = Generator(model, tokenizer)

    def answer(seed: int) -> str:
        settings = GenerationSettings(max_new_tokens=16, temperature=1.5, top_p=0.99, seed=seed)
        return generator.generate_batch([PROMPT, PROMPT], settings)

    first, again, other = answer(7), answer(7), answer(8)
    assert first == again and first != other
    assert first[0] != first[1]  # two rows of one batch draw apart


def test_a_sampled_answer_keeps_the_generation_settings_own_bans():
    model, tokenizer = build_tiny_model("gemma3"), make_tiny_tokenizer()
    settings = GenerationSettings(max_new_tokens=24, temperature=1.5, top_p=1.0, seed=3, no_repeat_ngram=1)
    inputs = tokenizer([PROMPT], return_tensors="pt")
    generator = Generator(model, tokenizer)
    torch.manual_seed(settings.seed)
    new = generator._generate_ids(inputs["input_ids"].tolist(), settings, ())[0]
    answer = [token for token in new if token not in generator.end_ids]
    assert len(answer) > 1 and len(set(answer)) == len(answer)  # no token twice: each one banned the next time
    assert set(answer).isdisjoint(inputs["input_ids"][0].tolist())  # nor any token of the prompt

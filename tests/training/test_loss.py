"""The chunked cross-entropy (and the targets' probabilities, and the held-out losses made from them) against a
float64 reference that builds the full logits."""

import pytest
import torch

from conftest import build_tiny_model
from lora import inject_trainable_tokens
from training import loss
from training.loss import ChunkedLinearCrossEntropy, earlier_answer_tokens
from training.step import held_out_losses

# bf16 weights take the other path through the loss: bf16 products copied into float32 logits.
TOLERANCE = {torch.float64: 1e-6, torch.bfloat16: 1e-1}  # bf16 logits of ~30 are off by ~0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("with_token_rows", [False, True], ids=["frozen-head", "token-rows"])
def test_chunked_cross_entropy_matches_float64_reference(softcap, with_token_rows, dtype):
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(50, 8, dtype=torch.float64) * 3).to(dtype)
    targets = torch.tensor([7, 42, 3, 42, 0, 7, 9, 11, 42, 5, 6, 7, 49])  # ids 7 and 42 often
    token_ids = torch.tensor([7, 42]) if with_token_rows else None
    rows = (torch.randn(2, 8, dtype=torch.float64) * 3).to(dtype).double().requires_grad_(True) if with_token_rows else None
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, softcap, 4, token_ids, rows)  # 4 + 4 + 4 + 1 rows
    loss.backward()

    reference_hidden = hidden.detach().double().requires_grad_(True)
    head = weight.double()
    if with_token_rows:
        reference_rows = rows.detach().clone().requires_grad_(True)
        head = head.index_copy(0, token_ids, reference_rows)
    logits = reference_hidden @ head.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    reference.backward()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(loss.double(), reference, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(hidden.grad.double(), reference_hidden.grad, rtol=tolerance, atol=tolerance)
    if with_token_rows:
        torch.testing.assert_close(rows.grad, reference_rows.grad, rtol=tolerance, atol=tolerance)


def test_earlier_answer_tokens_are_the_distinct_earlier_targets_but_the_position_s_own():
    ignore = -100
    targets = torch.tensor([[ignore, 4, 5, 7, 5, 9, 5],    # prompt position, then the answer
                            [ignore, ignore, 3, 3, 8, ignore, ignore]])  # padding at the end
    where = targets != ignore
    negatives = earlier_answer_tokens(targets, where)
    as_sets = [sorted(set(row.tolist()) - {-1}) for row in negatives]
    assert as_sets == [[], [4], [4, 5], [4, 7], [4, 5, 7], [4, 7, 9],  # row 0's answer positions 1..6
                       [], [], [3]]  # row 1: 3 is no negative of the second 3
    assert [int((row >= 0).sum()) for row in negatives] == [len(ids) for ids in as_sets]  # each id once


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
def test_unlikelihood_term_matches_float64_reference(softcap, dtype):
    """Cross-entropy + 0.7 x sum over each row's negatives of -log(1 - p), token rows included."""
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(50, 8, dtype=torch.float64) * 3).to(dtype)
    targets = torch.tensor([[7, 42, 3, 42, 0, 7, 9], [11, 42, 5, 6, 7, 49, -100]])
    where = targets != -100
    negatives = earlier_answer_tokens(targets, where)
    token_ids = torch.tensor([7, 42])
    rows = (torch.randn(2, 8, dtype=torch.float64) * 3).to(dtype).double().requires_grad_(True)
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets[where], softcap, 4, token_ids, rows, negatives, 0.7)
    loss.backward()

    reference_hidden = hidden.detach().double().requires_grad_(True)
    reference_rows = rows.detach().clone().requires_grad_(True)
    logits = reference_hidden @ weight.double().index_copy(0, token_ids, reference_rows).T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    reference = torch.nn.functional.cross_entropy(logits, targets[where], reduction="sum")
    probs = logits.softmax(dim=-1)
    for row, ids in enumerate(negatives):
        ids = ids[ids >= 0]
        reference = reference - 0.7 * torch.log1p(-probs[row, ids]).sum()
    reference.backward()
    assert (negatives >= 0).sum() > 10  # the term is not empty
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(loss.double(), reference, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(hidden.grad.double(), reference_hidden.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(rows.grad, reference_rows.grad, rtol=tolerance, atol=tolerance)


def test_per_token_weights_scale_each_token_s_loss_and_gradient():
    """What training/repetition.py relies on: negative weights too."""
    torch.manual_seed(1)
    hidden = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64) * 3
    targets = torch.randint(0, 50, (9,))
    weights = torch.randn(9, dtype=torch.float64)
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 30.0, 4, None, None, None, 0.0, weights)
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    logits = 30.0 * torch.tanh(reference_hidden @ weight.T / 30.0)
    reference = (weights * torch.nn.functional.cross_entropy(logits, targets, reduction="none")).sum()
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-9, atol=1e-12)


def tiny_float64_model_with_token_rows(kind: str) -> torch.nn.Module:
    """A tiny model in float64 whose tied head has trained rows for ids 4 and 5 (random, not the embedding's)."""
    model = build_tiny_model(kind).double()
    rows = inject_trainable_tokens(model, [4, 5])
    with torch.no_grad():
        rows.trainable_tokens_delta.normal_()
    return model.double()


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_target_probabilities_are_the_model_s_softmax_at_the_targets(kind, monkeypatch):
    """Chunked (4 rows at a time here), with trainable token rows in the tied head."""
    monkeypatch.setattr(loss, "LOSS_CHUNK_ROWS", 4)
    model = tiny_float64_model_with_token_rows(kind)
    input_ids = torch.randint(6, 200, (2, 7))
    targets = torch.randint(0, 200, (2, 7))
    targets[0, :3] = 5  # a trained row's id
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids).last_hidden_state
        expected = model(input_ids=input_ids).logits.softmax(-1).gather(2, targets[..., None]).squeeze(-1)
    found = loss.target_probabilities(model, hidden.reshape(14, -1), targets.reshape(14))
    torch.testing.assert_close(found, expected.reshape(14), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_held_out_losses_are_the_mean_token_loss_and_the_mean_loss_of_each_answer_s_last_token(kind, monkeypatch):
    """Forward only and chunked (3 rows at a time here), with trainable token rows in the tied head; against
    the full logits' cross-entropy in float64. Rows of different lengths, so the last label differs by row."""
    monkeypatch.setattr(loss, "LOSS_CHUNK_ROWS", 3)
    model = tiny_float64_model_with_token_rows(kind)
    input_ids = torch.randint(6, 200, (2, 8))
    labels = input_ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[1, 6:] = -100  # the shorter row's padding
    batch = {"input_ids": input_ids, "attention_mask": (labels != -100) | (torch.arange(8) < 3), "labels": labels}
    found = held_out_losses(model, [batch], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
    token_losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
    supervised = labels[:, 1:] != -100
    assert found["held_out_loss"] == pytest.approx(float(token_losses[supervised].mean()), rel=1e-9)
    last_losses = token_losses[0, 6] + token_losses[1, 4]  # each row's last label: positions 7 and 5
    assert found["held_out_end_loss"] == pytest.approx(float(last_losses / 2), rel=1e-9)

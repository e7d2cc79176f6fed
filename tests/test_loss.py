"""The chunked cross-entropy against a float64 reference that builds the full logits."""

import pytest
import torch

from loss import ChunkedLinearCrossEntropy, earlier_answer_tokens

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

"""The chunked cross-entropy against a float64 reference that builds the full logits."""

import pytest
import torch

from loss import ChunkedLinearCrossEntropy

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

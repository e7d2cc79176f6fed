"""The training loss: summed next-token cross-entropy at the labelled positions only, computed in
chunks so the full [tokens, vocabulary] logits are never built (Gemma's head is 262k wide); optionally
plus a token-level unlikelihood term against repeating the answer's own earlier tokens."""

from __future__ import annotations

import torch

from data.dataset import IGNORE_INDEX
from lora import output_head

# The 262k-wide logits are computed this many rows at a time, never all at once.
LOSS_CHUNK_ROWS = 256
# 1 - p below this counts as this (the log and the gradient stay finite), as in Welleck et al.
# 1 - p below this counts as this, so a log of it stays finite (Welleck et al.'s clamp); the unlikelihood
# and the pseudo-repetition terms share it.
PROBABILITY_FLOOR = 1e-5


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits = softcap(hidden @ weight.T) against `targets`.

    The full [tokens, vocab] logits are never built: each chunk's logits are made (transposed,
    [vocab, chunk]: the faster GEMM layout, below), turned into its loss and its gradient with
    respect to `hidden` (softmax - one_hot, through the soft-cap's derivative 1 - tanh^2, times the
    weight), and freed. The head weight is frozen, so only that small [tokens, hidden] gradient is
    kept for the backward pass. Logits are float32 (or wider).

    With `token_ids` and `token_rows` (trainable token rows of a tied head), the columns of those ids
    come from `token_rows @ hidden.T` instead, and their gradient (grad_logits[ids] @ hidden) is
    kept for `token_rows` as well.

    With `negatives` ([tokens, K] ids, -1 for none; see `earlier_answer_tokens`) and a weight
    `unlikelihood` > 0, each row adds Welleck et al.'s (2019) token-level unlikelihood loss, weight x
    sum_c -log(1 - p_c) over its negative ids c. Its gradient with respect to the logits is
    weight x (w_c at each c - (sum_c w_c) p), with w_c = p_c / (1 - p_c): made with the softmax, in its pass.

    With `weights` ([tokens], float), each token's cross-entropy and its gradient are multiplied by its weight
    (negative weights push the target's probability down): how training/repetition.py applies its loss's gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                chunk_rows: int, token_ids: torch.Tensor | None = None, token_rows: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None, unlikelihood: float = 0.0,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden.to(weight.dtype)
        count = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        head = _HeadChunks(weight, softcap, min(chunk_rows, count), token_ids, token_rows)
        rows = head.rows
        grad_rows = torch.zeros_like(token_rows, dtype=head.wide_dtype) if token_rows is not None else None
        ctx.rows_dtype = token_rows.dtype if token_rows is not None else None
        for start in range(0, count, chunk_rows):
            n = min(chunk_rows, count - start)
            chunk, chunk_targets = slice(start, start + n), targets[start:start + n]
            columns = torch.arange(n, device=hidden.device)
            logits, logits_low, chunk_tanh = head.shifted_logits(hidden[chunk])
            target_logits = logits[chunk_targets, columns]
            sums = logits.exp_().sum(dim=0)
            token_losses = sums.log() - target_logits
            total += (token_losses * weights[chunk]).sum() if weights is not None else token_losses.sum()
            if unlikelihood:  # softmax x (1 - sum_c w_c) + w_c at each c, in the same pass as the softmax
                ids, w, pushed = _unlikelihood(logits, sums, negatives[chunk].T, unlikelihood)
                total += pushed
                grad_logits = logits.mul_((1.0 - w.sum(dim=0)) / sums)
                grad_logits.scatter_add_(0, ids, w)  # absent ids add 0 (their w is 0) at row 0
            else:
                grad_logits = logits.div_(sums)  # softmax
            grad_logits[chunk_targets, columns] -= 1.0
            if weights is not None:
                grad_logits.mul_(weights[chunk].to(grad_logits.dtype))
            if softcap:
                grad_logits.mul_(chunk_tanh.square_().neg_().add_(1.0))  # through the soft-cap: 1 - tanh^2
            if rows is not None:
                grad_token_logits = grad_logits[token_ids]
                grad_rows += grad_token_logits @ hidden[chunk].to(grad_rows.dtype)
                grad_logits[token_ids] = 0.0  # their part of grad_hidden comes from the trainable rows
            logits_low.copy_(grad_logits)
            torch.mm(logits_low.T, weight, out=grad_hidden[chunk])
            if rows is not None:
                grad_hidden[chunk] += grad_token_logits.T.to(rows.dtype) @ rows
        ctx.save_for_backward(grad_hidden, grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_rows = ctx.saved_tensors
        grad_rows = (grad_rows * grad_output).to(ctx.rows_dtype) if grad_rows is not None else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None, None, grad_rows, None, None, None


class _HeadChunks:
    """The head's logits of one chunk of rows at a time, in buffers reused for every chunk.

    One set of [vocab, chunk] buffers serves every chunk and each step works in place: a fresh
    262k-wide temporary per operation costs a pass over memory (and page faults on the CPU).
    Vocabulary-major ([vocab, chunk], logits.T): weight @ hidden.T runs faster than hidden @ weight.T
    at 256 rows on the CPUs we train on, in float32 and bf16 (`python -m bench.head_layout`;
    docs/benchmarks.md), and the softmax reads the chunk in that layout.
    """

    def __init__(self, weight: torch.Tensor, softcap: float | None, width: int, token_ids: torch.Tensor | None,
                 token_rows: torch.Tensor | None):
        self.weight, self.softcap, self.token_ids = weight, softcap, token_ids
        self.rows = token_rows.detach().to(weight.dtype) if token_rows is not None else None
        self.wide_dtype = torch.promote_types(weight.dtype, torch.float32)
        vocab, device = weight.shape[0], weight.device
        self.low = torch.empty(vocab, width, dtype=weight.dtype, device=device)
        # In float32 `wide` is `low` itself, and the copies between them do nothing (copy_ to itself).
        self.wide = (self.low if self.wide_dtype == weight.dtype
                     else torch.empty(vocab, width, dtype=self.wide_dtype, device=device))
        self.tanh = torch.empty_like(self.wide) if softcap else None

    def shifted_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(the chunk's soft-capped logits, each column shifted so its largest is 0, in float32 or wider;
        the buffer in the weight's dtype; tanh(logits / softcap) before the shift, or None), all [vocab, n]."""
        vocab, n = self.weight.shape[0], hidden.shape[0]
        logits, logits_low = _leading(self.wide, vocab, n), _leading(self.low, vocab, n)
        torch.mm(self.weight, hidden.T, out=logits_low)
        if self.rows is not None:
            logits_low[self.token_ids] = self.rows @ hidden.T
        logits.copy_(logits_low)
        chunk_tanh = None
        if self.softcap:
            chunk_tanh = _leading(self.tanh, vocab, n)
            torch.tanh(logits.div_(self.softcap), out=chunk_tanh)
            torch.mul(chunk_tanh, self.softcap, out=logits)
        logits.sub_(logits.amax(dim=0))  # each column's largest logit is now 0
        return logits, logits_low, chunk_tanh


@torch.no_grad()
def target_log_probabilities(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's log-probability of each target ([tokens]) after `hidden` ([tokens, hidden]), in float32 or
    wider; chunked as the loss is, never the full logits. Forward only: no gradient pass over the head, which
    the loss's forward makes (and the held-out loss does not need)."""
    return torch.cat(list(_target_log_probability_chunks(model, hidden, targets)))


@torch.no_grad()
def target_probabilities(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The probability of each target: exp(target_log_probabilities), taken chunk by chunk as before the
    log-probabilities were split out, so DITTO's weights (training/repetition.py), and the adapters trained with them,
    stay bit for bit the same (a vectorized exp may round its tail elements differently by length)."""
    return torch.cat([chunk.exp() for chunk in _target_log_probability_chunks(model, hidden, targets)])


def _target_log_probability_chunks(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    """The targets' log-probabilities, LOSS_CHUNK_ROWS at a time."""
    weight, token_rows = output_head(model)
    token_ids, rows = (token_rows.token_ids, token_rows.trainable_tokens_delta) if token_rows else (None, None)
    hidden = hidden.to(weight.dtype)
    head = _HeadChunks(weight, model.config.final_logit_softcapping, min(LOSS_CHUNK_ROWS, len(targets)),
                       token_ids, rows)
    for start in range(0, len(targets), LOSS_CHUNK_ROWS):
        logits, _, _ = head.shifted_logits(hidden[start:start + LOSS_CHUNK_ROWS])
        chosen = targets[start:start + LOSS_CHUNK_ROWS]
        yield logits[chosen, torch.arange(len(chosen), device=hidden.device)] - logits.exp_().sum(dim=0).log()


def _unlikelihood(exp_logits: torch.Tensor, sums: torch.Tensor, negatives: torch.Tensor,
                  weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the negative ids [K, n] (-1: none) of a chunk whose softmax is exp_logits / sums: (ids, the
    gradient weights weight x w_c of the class docstring, the weighted loss summed). Only the [K, n]
    probabilities are read, so the caller applies the gradient in its one pass over the chunk.
    A p_c within PROBABILITY_FLOOR of 1 adds a constant (-log of the floor) and no gradient, as in
    Welleck et al.'s clamp."""
    present = negatives >= 0
    ids = negatives.clamp(min=0)
    p = exp_logits.gather(0, ids) / sums * present
    rest = (1.0 - p).clamp(min=PROBABILITY_FLOOR)
    w = torch.where(1.0 - p < PROBABILITY_FLOOR, 0.0, p / rest) * weight
    return ids, w, -weight * rest.log().sum()


def earlier_answer_tokens(targets: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The unlikelihood loss's negative ids of each position in `where` ([tokens, length], -1 for none):
    the distinct ids among the earlier targets in `where` of its row (the answer written so far, not the
    prompt, whose names an answer must copy), without the position's own target. Pushing them down is
    what keeps a greedy decoder from repeating its own lines."""
    length = targets.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool, device=targets.device).tril(-1)  # [t, t']: t' < t
    same = targets[:, :, None] == targets[:, None, :]  # [row, t, t']
    repeated = (same & earlier & where[:, None, :]).any(dim=-1)  # [row, t]: an earlier position has its id
    first = where & ~repeated
    negatives = earlier & first[:, None, :] & ~same
    return torch.where(negatives, targets[:, None, :], -1)[where]


def _leading(buffer: torch.Tensor, vocab: int, columns: int) -> torch.Tensor:
    """A contiguous [vocab, columns] view of the start of a [vocab, width] buffer (a shorter last chunk)."""
    return buffer.view(-1)[:vocab * columns].view(vocab, columns)


def supervised_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        unlikelihood: float = 0.0) -> torch.Tensor:
    """Sum of next-token losses over the positions that carry a label; logits only for those. With
    `unlikelihood` > 0, plus that weight x the token-level unlikelihood of the answer's earlier tokens."""
    hidden = decoder_hidden(model, batch)
    targets = batch["labels"][:, 1:]
    return loss_sum_at(model, hidden, targets, targets != IGNORE_INDEX, unlikelihood)


def decoder_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state


def loss_sum_at(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                where: torch.Tensor, unlikelihood: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed loss of predicting `targets` from `hidden[:, :-1]` at the positions in `where` (each position's
    loss times its entry in `weights`, shaped like `targets`, if given)."""
    weight, token_rows = output_head(model)
    token_ids, rows = (token_rows.token_ids, token_rows.trainable_tokens_delta) if token_rows else (None, None)
    negatives = earlier_answer_tokens(targets, where) if unlikelihood else None
    return ChunkedLinearCrossEntropy.apply(hidden[:, :-1][where], weight, targets[where],
                                           model.config.final_logit_softcapping, LOSS_CHUNK_ROWS, token_ids, rows,
                                           negatives, unlikelihood,
                                           weights[where] if weights is not None else None)


def count_supervised(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

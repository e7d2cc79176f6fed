"""Temperature and nucleus (top-p) sampling's filter, without sorting the whole vocabulary at every step.

transformers' TopPLogitsWarper sorts every row's logits: over Gemma's 262k-token vocabulary and a batch of
64 rows that sort takes longer than the model's own decoding step on a 2-core CPU. The
nucleus, the likeliest tokens whose probabilities reach p, is almost always a few dozen tokens, so this
filter looks at the `candidates` likeliest only (torch.topk) and keeps a token when the probability of the
tokens above it is below p, the rule TopPLogitsWarper applies. A row whose nucleus does not end within the
candidates goes through TopPLogitsWarper itself. The kept tokens are the same, up to the rounding of sums
that land exactly on p.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TopPLogitsWarper


class TemperatureAndNucleus(LogitsProcessor):
    """Divides the logits by `temperature`, then sets every token outside the top-`top_p` nucleus to -inf.

    Passed to `generate` as a custom logits processor (with the config's temperature and top-p left off):
    transformers runs custom processors before its own temperature and top-p warpers, so both steps are
    here, in their usual order, after any repetition penalty."""

    def __init__(self, temperature: float, top_p: float, candidates: int = 1024):
        self.temperature, self.top_p, self.candidates = temperature, top_p, candidates

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores / self.temperature
        if self.top_p >= 1.0:
            return scores
        top_logits, top_indices = scores.topk(min(self.candidates, scores.shape[-1]), dim=-1)
        probabilities = (top_logits - scores.logsumexp(dim=-1, keepdim=True)).exp()
        mass_above = probabilities.cumsum(dim=-1) - probabilities
        keep = mass_above < self.top_p
        filtered = torch.full_like(scores, -float("inf"))
        filtered.scatter_(1, top_indices, top_logits.masked_fill(~keep, -float("inf")))
        beyond = keep[:, -1]  # the last candidate is kept: the nucleus may go on past it
        if beyond.any():
            filtered[beyond] = TopPLogitsWarper(self.top_p)(input_ids[beyond], scores[beyond])
        return filtered

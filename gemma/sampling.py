"""Temperature and nucleus (top-p) sampling, without sorting or sampling over the whole vocabulary at every step.

transformers' own sampling sorts every row's logits (TopPLogitsWarper), then draws with torch.multinomial over
the softmax of all of them: over Gemma's 262k-token vocabulary and a batch of 64 rows, each of the two takes
longer than the model's own decoding step on a 2-core CPU. The nucleus, the likeliest tokens whose
probabilities reach p, is almost always a few dozen tokens, so `NucleusSampler` looks at the `candidates`
likeliest only (torch.topk), keeps a token when the probability of the tokens above it is below p (the rule
TopPLogitsWarper applies) and draws among those. A row whose nucleus does not end within the candidates is
filtered by TopPLogitsWarper itself and drawn from the whole vocabulary.

The drawn token reaches `generate` as the only finite logit of its row, so decoding stays greedy
(do_sample=False) and the argmax picks it. Draws use torch's global generator, so `torch.manual_seed`
repeats them.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TopPLogitsWarper

CANDIDATES = 1024
# Part of a sampled generation's cache key: the same seed draws other tokens under another way of drawing.
SAMPLER = f"nucleus within the top {CANDIDATES}, torch.multinomial"


class NucleusSampler(LogitsProcessor):
    """Draws each row's next token from softmax(logits / `temperature`) restricted to its top-`top_p` nucleus,
    and returns logits that are 0 at the drawn token and -inf elsewhere.

    Passed to `generate` as a custom logits processor with greedy decoding: transformers runs custom
    processors after its own (a repetition penalty, a banned n-gram), so the draw sees their logits."""

    def __init__(self, temperature: float, top_p: float, candidates: int = CANDIDATES):
        self.temperature, self.top_p, self.candidates = temperature, top_p, candidates

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        drawn = torch.full_like(scores, -float("inf"))
        return drawn.scatter_(1, self.draw(scores).unsqueeze(1), 0.0)

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """One token id per row of `scores` (logits)."""
        scaled = scores / self.temperature
        if self.top_p >= 1.0:
            return torch.multinomial(scaled.softmax(dim=-1), 1).squeeze(1)
        top_logits, top_ids = scaled.topk(min(self.candidates, scaled.shape[-1]), dim=-1)
        probabilities = (top_logits - scaled.logsumexp(dim=-1, keepdim=True)).exp()
        mass_above = probabilities.cumsum(dim=-1) - probabilities
        keep = mass_above < self.top_p  # the first candidate always: its mass above is 0
        # torch.multinomial takes weights that need not sum to 1: the kept probabilities are renormalized.
        picks = torch.multinomial(probabilities.masked_fill(~keep, 0.0), 1)
        tokens = top_ids.gather(1, picks).squeeze(1)
        wide = keep[:, -1]  # the last candidate is kept: the nucleus may go on past it
        if wide.any():
            filtered = TopPLogitsWarper(self.top_p)(None, scaled[wide])
            tokens[wide] = torch.multinomial(filtered.softmax(dim=-1), 1).squeeze(1)
        return tokens

"""The fast path's token choice on the device: transformers' logits processors, in generate's order (fast_decode.py)."""
from __future__ import annotations

from ..base import GenParams


def choose_token(logits, seen, eos, params: GenParams, step: int):
    """The next token from fp32 logits [1, vocab], on the device; no host sync. Several rows [n, vocab] choose the
    answer's tokens `step`, `step + 1` ... each after its own row (`seen` then has a row each: seen_after_each)."""
    import torch
    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if (early := params.min_new_tokens - step) > 0:  # rows whose token may not end the answer yet
        ended = logits.index_fill(1, eos, float("-inf"))
        logits = ended if early >= logits.shape[0] else torch.cat([ended[:early], logits[early:]])
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(params.temperature, 1e-5)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - params.top_p)
        drop[..., -1:] = False  # keep at least one
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).view(-1)


def seen_after_each(seen, inputs):
    """Rows [n, vocab]: row i is `seen` with inputs[0..i] added (the tokens the repetition penalty counts after the
    step's i-th token)."""
    import torch
    n = inputs.shape[0]
    rows = seen.expand(n, -1).clone()
    row, col = torch.tril_indices(n, n, device=inputs.device)
    rows[row, inputs[col]] = True
    return rows

"""Per-token log-probs without a full-vocabulary fp32 copy of the logits.

The output head runs on chunks of positions; each chunk's logits are upcast to
fp32, reduced to (log-softmax at the label) and dropped. Under autograd each chunk
is checkpointed, so backward recomputes its logits instead of keeping them: peak
logits memory is one chunk, (B, chunk, V), not (B, T, V).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_logprobs(hidden: torch.Tensor, head: Callable, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logprobs(hidden: torch.Tensor, head: Callable, labels: torch.Tensor,
                           chunk_size: int = 1024) -> torch.Tensor:
    """Log-probs of the labels under the model.

    hidden: (B, T, H) last hidden states; head: (.., H) -> (.., V); labels: (B, T),
    -100 where not scored. Returns (B, T) fp32 where entry t = log p(labels[t] | tokens < t),
    computed from hidden[:, t-1]; 0 where labels[t] == -100 (position 0 is never scored).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    batch, length = labels.shape
    out = hidden.new_zeros((batch, length), dtype=torch.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    for start in range(0, length - 1, chunk_size):
        stop = min(start + chunk_size, length - 1)
        if not mask[:, start:stop].any():
            continue
        piece = hidden[:, start:stop]
        if torch.is_grad_enabled() and piece.requires_grad:
            values = checkpoint(_chunk_logprobs, piece, head, safe_targets[:, start:stop], use_reentrant=False)
        else:
            values = _chunk_logprobs(piece, head, safe_targets[:, start:stop])
        out[:, start + 1: stop + 1] = values * mask[:, start:stop]
    return out


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(B, T) token log-probs and (B, T) mask -> (B,) sum (or mean over scored tokens)."""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)

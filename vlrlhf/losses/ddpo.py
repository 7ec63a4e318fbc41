"""Dense DPO (RLHF-V, Yu+ 2024, arXiv 2312.00849): corrected segments weigh more.

RLHF-V scores an answer y as
    log pi(y|x) = 1/N [ sum_{t unchanged} log p(y_t) + gamma sum_{t changed} log p(y_t) ],
    N = |unchanged| + gamma |changed|,
where "changed" tokens are those of the human correction (chosen) that differ from
the original (rejected) answer, and gamma (5 in the paper) up-weights them. Those
scores then go into any DPO loss type in place of summed log-probs. The token weights
come from the records' corrected character spans (vlrlhf.data.token_weights; spans from a
word diff when a record has none), set when `algorithm.ddpo_gamma` is given.
"""

from __future__ import annotations

import torch

from vlrlhf.losses.aggregation import check_same_shape, upcast


def weighted_sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, token_weights: torch.Tensor | None,
                            average: bool = True) -> torch.Tensor:
    """(B, T) token log-probs, (B, T) mask, (B, T) weights -> (B,) weighted sum, or its
    weighted mean sum(w lp m) / sum(w m) when `average` (the RLHF-V score). No weights:
    all 1. Rows with an empty mask give 0."""
    check_same_shape(token_logps=token_logps, mask=mask, token_weights=token_weights)
    weights = mask.to(torch.float32) if token_weights is None else upcast(token_weights) * mask
    total = (upcast(token_logps) * weights).sum(-1)
    if not average:
        return total
    return total / weights.sum(-1).clamp(min=1e-8)


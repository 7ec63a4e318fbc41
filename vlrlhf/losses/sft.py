"""Supervised fine-tuning: token-level negative log-likelihood."""

from __future__ import annotations

import torch

from vlrlhf.losses.aggregation import aggregate, upcast


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean",
             norm_length: float | None = None) -> torch.Tensor:
    """NLL = aggregate(-log p(y_t | y_<t, x)) over the label mask.

    token_logps: (B, T) log-probs of the labels; mask: (B, T) bool. Returns a scalar.
    `aggregation` as in vlrlhf.losses.aggregation ("token-mean" is the usual SFT
    loss; "seq-mean-token-mean" weighs every example equally). An empty mask gives 0.
    """
    return aggregate(-upcast(token_logps), mask, aggregation, norm_length)

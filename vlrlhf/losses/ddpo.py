"""Dense DPO (RLHF-V, Yu+ 2024, arXiv 2312.00849): corrected segments weigh more.

RLHF-V scores an answer y as
    log pi(y|x) = 1/N [ sum_{t unchanged} log p(y_t) + gamma sum_{t changed} log p(y_t) ],
    N = |unchanged| + gamma |changed|,
where "changed" tokens are those of the human correction (chosen) that differ from
the original (rejected) answer, and gamma (5 in the paper) up-weights them. Those
scores then go into any DPO loss type in place of summed log-probs.
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


def changed_token_mask(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor, min_match: int = 3,
                       chosen_mask: torch.Tensor | None = None,
                       rejected_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Tc), (B, Tr) token ids -> (B, Tc) bool: True for chosen tokens that are changed.

    A chosen token is unchanged when it lies inside a run of >= `min_match` consecutive
    tokens that also occurs, in the same order, somewhere in the rejected answer; every
    other (valid) chosen token is changed. Runs shorter than `min_match` (a shared "the")
    do not count as matches. Masks mark valid tokens (default: all).

    Vectorised over the batch and the rejected positions: the loop runs over chosen
    positions only, computing diagonal run lengths of the (Tc, Tr) match matrix forward
    and backward; a token is matched when the longest diagonal run through it is long
    enough. Suited to a preprocessing pass (the mask is a column of the data set).
    """
    if chosen_ids.dim() != 2 or rejected_ids.dim() != 2 or chosen_ids.shape[0] != rejected_ids.shape[0]:
        raise ValueError(f"chosen_ids {tuple(chosen_ids.shape)} and rejected_ids {tuple(rejected_ids.shape)} "
                         "must be (B, Tc) and (B, Tr) with the same B")
    if min_match < 1:
        raise ValueError(f"min_match={min_match} must be >= 1")
    chosen_mask = torch.ones_like(chosen_ids, dtype=torch.bool) if chosen_mask is None else chosen_mask.bool()
    rejected_mask = torch.ones_like(rejected_ids, dtype=torch.bool) if rejected_mask is None else rejected_mask.bool()
    equal = (chosen_ids[:, :, None] == rejected_ids[:, None, :]) & chosen_mask[:, :, None] & rejected_mask[:, None, :]
    equal = equal.to(torch.int32)  # (B, Tc, Tr)
    batch, chosen_len, rejected_len = equal.shape
    forward = torch.zeros_like(equal)
    backward = torch.zeros_like(equal)
    zero_column = equal.new_zeros((batch, 1))
    for i in range(chosen_len):  # run length ending at (i, j)
        previous = forward[:, i - 1, :-1] if i > 0 else equal.new_zeros((batch, rejected_len - 1))
        forward[:, i] = equal[:, i] * (torch.cat([zero_column, previous], dim=1) + 1)
    for i in range(chosen_len - 1, -1, -1):  # run length starting at (i, j)
        following = backward[:, i + 1, 1:] if i < chosen_len - 1 else equal.new_zeros((batch, rejected_len - 1))
        backward[:, i] = equal[:, i] * (torch.cat([following, zero_column], dim=1) + 1)
    longest = (forward + backward - 1).amax(dim=2)  # (B, Tc) longest run through chosen token i
    return chosen_mask & (longest < min_match)

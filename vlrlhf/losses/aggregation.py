"""Token aggregation shared by the SFT and policy-gradient losses.

values, mask: (B, T). Modes (the names veRL uses):

- token-mean               sum(v * m) / sum(m)                 every token weighs the same
- seq-mean-token-sum       mean_b sum_t(v * m)                 every sequence, unnormalised by length
- seq-mean-token-mean      mean_b [sum_t(v * m) / sum_t(m)]    every sequence weighs the same (GRPO paper)
- seq-mean-token-sum-norm  sum(v * m) / (B * norm_length)      Dr. GRPO: a constant length, no length bias

Empty masks are defined, not errors: a batch with no scored token aggregates to 0,
and so does an empty row inside seq-mean-token-mean. Every mode is unchanged by
extra padding columns (norm_length is a constant the caller chooses, e.g. the
maximum response length).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def check_same_shape(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor is not None and tensor.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {first_name} has {tuple(first.shape)}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm_length: float | None = None) -> torch.Tensor:
    """Scalar aggregate of per-token `values` (B, T) over `mask` (B, T)."""
    check_same_shape(values=values, mask=mask)
    mask = mask.to(values.dtype)
    masked = values * mask
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError("norm_length must be a positive constant for aggregation='seq-mean-token-sum-norm'")
        return masked.sum() / (values.shape[0] * norm_length)
    raise ValueError(f"aggregation={mode!r} is not one of {', '.join(AGGREGATIONS)}")


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the loss math; fp32 and fp64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) or not tensor.is_floating_point() \
        else tensor

"""Per-token log-probs without a full-vocabulary fp32 copy of the logits.

The output head runs only on the states that predict a label (answers are a small
share of a VLM row: image tokens and the prompt are never scored), in chunks; each
chunk's logits are upcast to fp32, reduced to (log-softmax at the label) and dropped.
Under autograd each chunk is checkpointed, so backward recomputes its logits instead
of keeping them: peak logits memory is one chunk, (chunk, V), not (B, T, V).
A head that ZeRO-3 partitions runs as one chunk: every call gathers its weight, a
collective, and ranks whose micro-batches hold different numbers of scored tokens would
otherwise make different numbers of calls and wait on each other forever. If that head is
frozen (LoRA under ZeRO-3) the chunk is not checkpointed either: DeepSpeed gathers the
weight for the module's forward and backward, not for a recompute inside the backward
(the recomputed weight is the empty partition), so the logits are kept for backward:
(scored tokens, V) fp32 per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_logprobs(hidden: torch.Tensor, head: Callable, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def partitioned(head: Callable) -> list[torch.nn.Parameter]:
    """The head's parameters that ZeRO-3 partitions across ranks (DeepSpeed tags them ds_id)."""
    parameters = head.parameters() if isinstance(head, torch.nn.Module) else ()
    return [p for p in parameters if hasattr(p, "ds_id")]


def chunked_token_logprobs(hidden: torch.Tensor, head: Callable, labels: torch.Tensor,
                           chunk_size: int = 1024, index: torch.Tensor | None = None,
                           row_of: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs of the labels under the model.

    hidden: (B, N, H) last hidden states; head: (.., H) -> (.., V); labels: (B, T),
    -100 where not scored. Returns (B, T) fp32 where entry t = log p(labels[t] | tokens < t),
    computed from the state of position t-1; 0 where labels[t] == -100 (position 0 is
    never scored). `index` (B, T): where position t's state lies in `hidden` (packed pair
    rows, see models.pairs); default t itself (N == T). `row_of` (B,): the row of `hidden`
    holding row b's states (packed groups, see models.groups); default b itself.

    The head runs only on the states that predict a label, in chunks of `chunk_size`.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    out = hidden.new_zeros(labels.shape, dtype=torch.float32)
    rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # label at positions + 1
    if len(rows) == 0:
        return out
    states = positions if index is None else index[rows, positions]
    targets = labels[rows, positions + 1]
    sharded = partitioned(head)
    recompute = not any(not p.requires_grad for p in sharded)
    if sharded:  # one gather per call on every rank, whatever its number of scored tokens
        chunk_size = len(rows)
    values = []
    for start in range(0, len(rows), chunk_size):
        at_rows = rows[start:start + chunk_size]
        piece = hidden[at_rows if row_of is None else row_of[at_rows], states[start:start + chunk_size]]
        chunk_targets = targets[start:start + chunk_size]
        if torch.is_grad_enabled() and piece.requires_grad and recompute:
            values.append(checkpoint(_chunk_logprobs, piece, head, chunk_targets, use_reentrant=False))
        else:
            values.append(_chunk_logprobs(piece, head, chunk_targets))
    return out.index_put((rows, positions + 1), torch.cat(values))


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(B, T) token log-probs and (B, T) mask -> (B,) sum (or mean over scored tokens)."""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)

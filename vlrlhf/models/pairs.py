"""The preference forward: a pair's image and prompt go through the model once.

A pair's chosen and rejected rows hold the same images and the same prompt; only the
answers differ. `pack_pairs` lays each pair out as ONE row

    [ shared prefix | chosen continuation | rejected continuation | padding ]

where the shared prefix is the longest common token prefix of the two rows (image
tokens, prompt, and any common start of the answers). The 4D attention mask lets each
token see exactly what it sees in its own row: rejected tokens see the prefix and each
other, never the chosen continuation. Position ids are each token's ids in its own row,
so the rejected continuation restarts at the fork. The vision tower and the prefix run
once per pair; autograd adds the prefix's gradients from both answers, as two separate
forwards would.

The adapter supplies what differs by family: a row's position ids (M-RoPE for Qwen2-VL)
and extra attention (PaliGemma's bidirectional prefix).
"""

from __future__ import annotations

import dataclasses

import torch

from vlrlhf.models.batch import ModelBatch

PREFIX, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


@dataclasses.dataclass
class PackedPairs:
    """Where every packed token comes from (all on the batch's device)."""

    branch: torch.Tensor  # (B, N) long: PREFIX, CHOSEN, REJECTED or PADDING
    order: torch.Tensor  # (B, N) long: index of the token in its own unpadded row (0 on padding)
    source: torch.Tensor  # (B, N) long: its position in the padded chosen batch (prefix, chosen) or rejected batch
    chosen_index: torch.Tensor  # (B, Tc) long: packed position of each chosen-batch position (0 on padding)
    rejected_index: torch.Tensor  # (B, Tr) long: the same for the rejected batch

    def take(self, chosen: torch.Tensor, rejected: torch.Tensor, fill=0) -> torch.Tensor:
        """Per-position values (..., B, Tc) and (..., B, Tr) -> (..., B, N): each packed token's
        value in the row it came from; `fill` on padding."""
        is_rejected = self.branch == REJECTED
        lead = chosen.shape[:-2]
        from_chosen = torch.where(is_rejected, 0, self.source).expand(*lead, -1, -1)
        from_rejected = torch.where(is_rejected, self.source, 0).expand(*lead, -1, -1)
        out = torch.where(is_rejected, rejected.gather(-1, from_rejected), chosen.gather(-1, from_chosen))
        return out.masked_fill(self.branch == PADDING, fill)

    def allowed(self) -> torch.Tensor:
        """(B, N, N) bool, [b, q, k]: query q may attend to key k. Causal within each row; a
        padding query sees only itself (no row of the mask is empty)."""
        query, key = self.branch[:, :, None], self.branch[:, None, :]
        causal = self.order[:, None, :] <= self.order[:, :, None]
        same_row = (key == PREFIX) | (key == query)
        eye = torch.eye(self.branch.shape[1], dtype=torch.bool, device=self.branch.device)
        return (causal & same_row & (key != PADDING)) | eye


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    length = min(len(a), len(b))
    differ = (a[:length] != b[:length]).nonzero()
    return int(differ[0]) if len(differ) else length


def pack_pairs(chosen: ModelBatch, rejected: ModelBatch) -> PackedPairs:
    """The packing plan of a pair batch (row i of `chosen` and of `rejected` are one pair;
    either padding side). Built on the CPU, returned on the batch's device."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen rows but {len(rejected)} rejected rows")
    chosen_mask, rejected_mask = chosen.attention_mask.bool().cpu(), rejected.attention_mask.bool().cpu()
    chosen_ids, rejected_ids = chosen.input_ids.cpu(), rejected.input_ids.cpu()
    rows = []
    for b in range(len(chosen)):
        at_c, at_r = chosen_mask[b].nonzero().squeeze(1), rejected_mask[b].nonzero().squeeze(1)
        rows.append((at_c, at_r, common_prefix_length(chosen_ids[b, at_c], rejected_ids[b, at_r])))
    width = max(len(at_c) + len(at_r) - fork for at_c, at_r, fork in rows)
    size = (len(chosen), width)
    branch = torch.full(size, PADDING, dtype=torch.long)
    order, source = torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.long)
    chosen_index = torch.zeros(chosen_ids.shape, dtype=torch.long)
    rejected_index = torch.zeros(rejected_ids.shape, dtype=torch.long)
    for b, (at_c, at_r, fork) in enumerate(rows):
        length_c, tail = len(at_c), len(at_r) - fork
        branch[b, :fork] = PREFIX
        branch[b, fork:length_c] = CHOSEN
        branch[b, length_c:length_c + tail] = REJECTED
        order[b, :length_c] = torch.arange(length_c)
        order[b, length_c:length_c + tail] = torch.arange(fork, fork + tail)
        source[b, :length_c] = at_c
        source[b, length_c:length_c + tail] = at_r[fork:]
        chosen_index[b, at_c] = torch.arange(length_c)
        rejected_index[b, at_r[:fork]] = torch.arange(fork)
        rejected_index[b, at_r[fork:]] = torch.arange(length_c, length_c + tail)
    device = chosen.input_ids.device
    return PackedPairs(branch.to(device), order.to(device), source.to(device), chosen_index.to(device),
                       rejected_index.to(device))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, N) bool -> (B, 1, N, N) 0 / dtype-min, the form eager attention adds to its scores."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@dataclasses.dataclass
class PairStates:
    """Last hidden states of a pair batch and where each row's positions lie in them.
    Packed: `chosen` and `rejected` are the same (B, N, H) tensor; separate: each its own."""

    chosen: torch.Tensor  # (B, N, H)
    chosen_index: torch.Tensor  # (B, Tc) long: position in `chosen` of each chosen-batch position
    rejected: torch.Tensor  # (B, N', H)
    rejected_index: torch.Tensor  # (B, Tr) long
    packed: bool


def identity_index(batch: ModelBatch) -> torch.Tensor:
    """(B, T) positions 0..T-1: a row's own hidden states, unpacked."""
    batch_size, length = batch.input_ids.shape
    return torch.arange(length, device=batch.input_ids.device).expand(batch_size, length)

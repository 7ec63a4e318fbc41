"""The group forward: n completions of one prompt go through the model as ONE row.

Online RL samples n completions per prompt (GRPO's group); scored as separate rows, the
vision tower and the prompt run n times. `pack_groups` lays each group out as

    [ shared prefix | continuation 1 | continuation 2 | ... | continuation n | padding ]

where the shared prefix is the longest token prefix common to all members (the image
tokens, the prompt, any common start of the answers). As in the pair forward
(vlrlhf.models.pairs, the n = 2 case), the 4D mask lets each token see exactly what it
sees in its own row (the prefix and its own continuation, causally) and position ids are
each token's ids in its own row, so a continuation restarts at the fork. Autograd adds
the prefix's gradients from every member, as n separate forwards would.

The caller names the groups (rows answering the same prompt, hence the same images) and
gives one collated row per group (`representatives`) for the family's image inputs.
"""

from __future__ import annotations

import dataclasses

import torch

from vlrlhf.models.batch import ModelBatch

PREFIX, PADDING = 0, -1


@dataclasses.dataclass
class PackedGroups:
    """Where every packed token comes from (all on the batch's device)."""

    branch: torch.Tensor  # (G, N) long: PREFIX, k for the group's k-th member (1-based), PADDING
    order: torch.Tensor  # (G, N) long: index of the token in its own unpadded row (0 on padding)
    source: torch.Tensor  # (G, N) long: flat position b * T + t in the (B, T) batch (0 on padding)
    group_of: torch.Tensor  # (B,) long: the packed row of each batch row
    index: torch.Tensor  # (B, T) long: packed position of each batch position (0 on padding)

    def take(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """Per-position values (..., B, T) -> (..., G, N): each packed token's value in the row it
        came from; `fill` on padding."""
        lead = values.shape[:-2]
        flat = values.reshape(*lead, -1)
        source = self.source.reshape(-1).expand(*lead, -1)
        out = flat.gather(-1, source).reshape(*lead, *self.source.shape)
        return out.masked_fill(self.branch == PADDING, fill)

    def allowed(self) -> torch.Tensor:
        """(G, N, N) bool, [g, q, k]: query q may attend to key k. Causal within each member's
        row; a padding query sees only itself (no row of the mask is empty)."""
        query, key = self.branch[:, :, None], self.branch[:, None, :]
        causal = self.order[:, None, :] <= self.order[:, :, None]
        same_row = (key == PREFIX) | (key == query)
        eye = torch.eye(self.branch.shape[1], dtype=torch.bool, device=self.branch.device)
        return (causal & same_row & (key != PADDING)) | eye

    @property
    def packed_rows(self) -> int:
        return int(self.group_of.numel())


def groups_of(keys: list) -> list[list[int]]:
    """Row indices grouped by key (the prompt each row answers), in first-seen order."""
    out: dict = {}
    for index, key in enumerate(keys):
        out.setdefault(key, []).append(index)
    return list(out.values())


def _common_prefix(rows: list[torch.Tensor]) -> int:
    length = min(len(r) for r in rows)
    first = rows[0][:length]
    fork = length
    for other in rows[1:]:
        differ = (first[:fork] != other[:fork]).nonzero()
        if len(differ):
            fork = int(differ[0])
    return fork


def pack_groups(batch: ModelBatch, groups: list[list[int]]) -> PackedGroups:
    """The packing plan of `batch` (either padding side) with `groups` (lists of row indices,
    every row in exactly one). Built on the CPU, returned on the batch's device."""
    size, length = batch.input_ids.shape
    if sorted(i for group in groups for i in group) != list(range(size)):
        raise ValueError(f"groups {groups} do not cover the batch's {size} rows once each")
    mask, ids = batch.attention_mask.bool().cpu(), batch.input_ids.cpu()
    real = [mask[b].nonzero().squeeze(1) for b in range(size)]
    forks = [_common_prefix([ids[b, real[b]] for b in group]) for group in groups]
    width = max(fork + sum(len(real[b]) - fork for b in group) for group, fork in zip(groups, forks, strict=True))
    shape = (len(groups), width)
    branch = torch.full(shape, PADDING, dtype=torch.long)
    order, source = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    group_of = torch.zeros(size, dtype=torch.long)
    index = torch.zeros((size, length), dtype=torch.long)
    for g, (group, fork) in enumerate(zip(groups, forks, strict=True)):
        first = real[group[0]]
        branch[g, :fork] = PREFIX
        order[g, :fork] = torch.arange(fork)
        source[g, :fork] = group[0] * length + first[:fork]
        at = fork
        for member, b in enumerate(group, start=1):
            tail = real[b][fork:]
            end = at + len(tail)
            branch[g, at:end] = member
            order[g, at:end] = torch.arange(fork, fork + len(tail))
            source[g, at:end] = b * length + tail
            group_of[b] = g
            index[b, real[b][:fork]] = torch.arange(fork)
            index[b, tail] = torch.arange(at, end)
            at = end
    device = batch.input_ids.device
    return PackedGroups(branch.to(device), order.to(device), source.to(device), group_of.to(device),
                        index.to(device))

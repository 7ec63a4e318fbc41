"""Encoded examples and padded batches: the typed data that crosses actor boundaries."""

from __future__ import annotations

import dataclasses

import torch

IGNORE_INDEX = -100


@dataclasses.dataclass
class EncodedExample:
    """One conversation after the processor: image tokens already expanded."""

    input_ids: list[int]  # (T,) token ids
    labels: list[int]  # (T,) = input_ids at assistant tokens, -100 elsewhere
    token_arrays: dict[str, list[int]]  # (T,) each: mm_token_type_ids, token_type_ids
    extras: dict[str, torch.Tensor]  # processor outputs for this example, leading dim 1 or n_images
    label_weights: list[float] | None = None  # (T,) DDPO token weights; None: every label weighs 1

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclasses.dataclass
class ModelBatch:
    """A padded batch, ready for the model's forward."""

    input_ids: torch.Tensor  # (B, T) long, padded with the pad id
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    labels: torch.Tensor  # (B, T) long, target ids on assistant tokens, -100 elsewhere
    extras: dict[str, torch.Tensor]  # family inputs: pixel_values (n_img, ...), image_grid_thw (n_img, 3), ...
    label_weights: torch.Tensor | None = None  # (B, T) float, DDPO token weights (0 on padding)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, T) bool, True where a label is scored."""
        return self.labels != IGNORE_INDEX

    def to(self, device, float_dtype: torch.dtype | None = None, moved: dict | None = None) -> ModelBatch:
        """On `device`. `moved` (id -> moved tensor), shared by the batches of a pair, moves a
        tensor they share (the pixels) once, so they still share it there."""
        def copy(tensor: torch.Tensor) -> torch.Tensor:
            if float_dtype is not None and tensor.is_floating_point():
                return tensor.to(device=device, dtype=float_dtype)
            return tensor.to(device)

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if moved is None:
                return copy(tensor)
            if id(tensor) not in moved:  # the caller holds the batches, so ids stay unique meanwhile
                moved[id(tensor)] = copy(tensor)
            return moved[id(tensor)]

        return ModelBatch(move(self.input_ids), move(self.attention_mask), move(self.labels),
                          {name: move(value) for name, value in self.extras.items()},
                          None if self.label_weights is None else self.label_weights.to(device))


def _pad_dim(tensor: torch.Tensor, dim: int, size: int, value: float = 0) -> torch.Tensor:
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)


def collate_extra(values: list[torch.Tensor | None], rule: str) -> torch.Tensor | None:
    """Combine one model extra across examples. Rules:

    concat      cat along dim 0 over the examples that have it (images flat over the batch)
    concat_pad  as concat, padding dim 1 first (LLaVA-NeXT: patches per image)
    stack_pad   one row per example, dim 1 padded (Idefics3: images per example); an
                example without images gets an all-zero row, which the model skips
    stack_seq   one row per example, dim 1 (a sequence) right-padded with 0 (Q-Former ids)
    """
    present = [value for value in values if value is not None]
    if not present:
        return None
    if rule == "concat":
        return torch.cat(present, dim=0)
    if rule in ("concat_pad", "stack_pad", "stack_seq"):
        size = max(value.shape[1] for value in present)
        if rule == "concat_pad":
            return torch.cat([_pad_dim(value, 1, size) for value in present], dim=0)
        template = present[0]
        rows = []
        for value in values:
            if value is None:
                shape = (1, size, *template.shape[2:])
                value = template.new_zeros(shape)
            rows.append(_pad_dim(value, 1, size))
        return torch.cat(rows, dim=0)
    raise ValueError(f"unknown collation rule {rule!r}")


def collate_examples(examples: list[EncodedExample], *, pad_id: int, rules: dict[str, str],
                     padding_side: str = "right") -> ModelBatch:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    length = max(len(example) for example in examples)

    def pad(values: list[int], fill: int) -> list[int]:
        padding = [fill] * (length - len(values))
        return padding + values if padding_side == "left" else values + padding

    input_ids = torch.tensor([pad(e.input_ids, pad_id) for e in examples], dtype=torch.long)
    labels = torch.tensor([pad(e.labels, IGNORE_INDEX) for e in examples], dtype=torch.long)
    attention = torch.tensor([pad([1] * len(e), 0) for e in examples], dtype=torch.long)
    extras: dict[str, torch.Tensor] = {}
    for name in sorted({name for e in examples for name in e.token_arrays}):
        extras[name] = torch.tensor([pad(e.token_arrays.get(name, [0] * len(e)), 0) for e in examples],
                                    dtype=torch.long)
    for name, rule in rules.items():
        value = collate_extra([e.extras.get(name) for e in examples], rule)
        if value is not None:
            extras[name] = value
    weights = None
    if any(e.label_weights is not None for e in examples):
        weights = torch.tensor([pad(e.label_weights if e.label_weights is not None else [1.0] * len(e), 0.0)
                                for e in examples], dtype=torch.float32)
    return ModelBatch(input_ids, attention, labels, extras, weights)

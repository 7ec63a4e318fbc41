"""A scalar head on a VLM: the reward model's score and the critic's values.

    head = ScalarHead.create(model)                          # Linear(H, 1)
    scores = last_token_scores(adapter, model, head, batch)  # (B,) at each row's last real token
    values = token_values(adapter, model, head, batch)       # (B, T), aligned with the labels

The backbone stays a plain Hugging Face folder (`from_pretrained` loads it); the head
is saved beside it as `value_head.safetensors`.
"""

from __future__ import annotations

import json
import pathlib

import torch

from vlrlhf.models.base import unwrap
from vlrlhf.models.batch import ModelBatch

HEAD_FILE = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"


class ScalarHead(torch.nn.Module):
    """hidden (.., H) -> fp32 scalar (..)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=dtype)
        torch.nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        torch.nn.init.zeros_(self.linear.bias)

    @classmethod
    def create(cls, model) -> ScalarHead:
        embeddings = unwrap(model).get_output_embeddings().weight
        return cls(embeddings.shape[1]).to(embeddings.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)
    if (last < 0).any():
        raise ValueError("a row of the batch has no real tokens")
    return last


def last_token_scores(adapter, model, head: ScalarHead, batch: ModelBatch, groups: list[list[int]] | None = None,
                      representatives: ModelBatch | None = None) -> torch.Tensor:
    """(B,) the head read at the last non-pad token: the reward model's score of the whole text.
    `groups`, `representatives`: rows of one prompt in one packed row (adapter.group_hidden)."""
    hidden, plan = adapter.group_hidden(model, batch, groups, representatives)
    rows = torch.arange(len(batch), device=hidden.device)
    last = last_positions(batch.attention_mask)
    if plan is not None:
        return head(hidden[plan.group_of, plan.index[rows, last]])
    return head(hidden[rows, last])


def pair_last_token_scores(adapter, model, head: ScalarHead, chosen: ModelBatch,
                           rejected: ModelBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) and (B,) last_token_scores of a pair batch from one preference forward
    (adapter.pair_states: each pair's images and prompt go through the model once)."""
    states = adapter.pair_states(model, chosen, rejected)
    scores = []
    for hidden, index, batch in ((states.chosen, states.chosen_index, chosen),
                                 (states.rejected, states.rejected_index, rejected)):
        rows = torch.arange(len(batch), device=hidden.device)
        scores.append(head(hidden[rows, index[rows, last_positions(batch.attention_mask)]]))
    return scores[0], scores[1]


def token_values(adapter, model, head: ScalarHead, batch: ModelBatch, groups: list[list[int]] | None = None,
                 representatives: ModelBatch | None = None) -> torch.Tensor:
    """(B, T) V(s_t) for each labelled token t, read at position t - 1 (the state the token
    was generated from, as its log-prob is); 0 off the labels. `groups`, `representatives`:
    rows of one prompt scored in one packed row (adapter.group_hidden), where they pack."""
    hidden, plan = adapter.group_hidden(model, batch, groups, representatives)
    if plan is not None:
        hidden = hidden[plan.group_of[:, None], plan.index]  # (B, T, H): each row's own states
    values = head(hidden)
    out = torch.zeros_like(values)
    out[:, 1:] = values[:, :-1]
    return out * batch.loss_mask


def save_head(head: ScalarHead, folder: str | pathlib.Path) -> None:
    from safetensors.torch import save_file

    folder = pathlib.Path(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, folder / HEAD_FILE)
    (folder / HEAD_CONFIG).write_text(json.dumps({"hidden_size": head.linear.in_features,
                                                  "read_at": "last non-pad token"}) + "\n")


def has_head(folder: str | pathlib.Path) -> bool:
    return (pathlib.Path(folder) / HEAD_FILE).is_file()


def load_head(folder: str | pathlib.Path, model=None) -> ScalarHead:
    """The saved head of `folder`; a fresh one sized for `model` when `folder` has none."""
    from safetensors.torch import load_file

    path = pathlib.Path(folder) / HEAD_FILE
    if not path.is_file():
        if model is None:
            raise FileNotFoundError(f"{folder}: no {HEAD_FILE} (is this a reward model checkpoint?)")
        return ScalarHead.create(model)
    state = load_file(path)
    head = ScalarHead(state["linear.weight"].shape[1])
    head.load_state_dict(state)
    return head

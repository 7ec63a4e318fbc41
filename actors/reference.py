"""The reference role: a frozen model's log-probs for the offline objectives.

`logprobs(micro_batches)` returns, per micro-batch, what the objective needs:
PairLogps for DPO pairs, (completion, mismatched) log-probs for KTO.
"""

from __future__ import annotations

import torch

from actors.group import WorkerBase
from actors.policy import device, load_options
from vlrlhf.config import ModelSpec
from vlrlhf.models.registry import load_adapter
from vlrlhf.data.pipeline import PairBatch
from vlrlhf.training import RLBatch, move_pairs, pair_logps, sequence_logps


@torch.no_grad()
def reference_logps(adapter, model, micro_batches: list, on: torch.device) -> list:
    out = []
    for micro in micro_batches:
        if isinstance(micro, PairBatch):
            out.append(pair_logps(adapter, model, move_pairs(micro, on)).cpu())
        elif isinstance(micro, RLBatch):  # token log-probs for the KL term
            out.append(adapter.rollout_logprobs(model, micro.batch.to(on)).cpu())
        else:  # KTOBatch
            out.append((sequence_logps(adapter, model, micro.completions.to(on))[0].cpu(),
                        sequence_logps(adapter, model, micro.mismatched.to(on))[0].cpu()))
    return out


class ReferenceWorker(WorkerBase):
    def __init__(self, model: ModelSpec, path: str | None = None):
        self.device = device()
        self.adapter = load_adapter(path or model.path, adapter=model.adapter, options=load_options(model))
        self.model = self.adapter.load_model(load_options(model)).to(self.device).eval()
        self.model.requires_grad_(False)

    def logprobs(self, micro_batches: list) -> list:
        return reference_logps(self.adapter, self.model, micro_batches, self.device)

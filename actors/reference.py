"""The reference role: a frozen model's log-probs for the offline objectives.

`logprobs(micro_batches)` returns, per micro-batch, what the objective needs:
PairLogps for DPO pairs, (completion, mismatched) log-probs for KTO.
"""

from __future__ import annotations

import math

import torch

from actors.group import WorkerBase
from actors.common import device, load_options
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
            out.append(micro.to(on).logprobs(adapter, model)[0].cpu())  # the group forward where rows pack
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

    def score_rows(self, share) -> list[list[float]]:
        """Reference log-probs of each row of a RowsShare (vlrlhf.rows), over its completion tokens."""
        from vlrlhf.rows import score_share

        return score_share(self.adapter, share, self.logprobs)


# ---------------------------------------------------------------- the reference as a pipeline stage

def row_values(output, rows: int) -> list[list[float]]:
    """One micro-batch's reference output -> a short list of floats per row: what the pipeline's
    `reference` column and the precomputed Parquet hold (an Arrow list<double>, never a pickle).
    Pairs: chosen, rejected log-probs, their token counts and mDPO's corrupted-image log-prob
    (NaN without mDPO); KTO: the completion's and its mismatched twin's log-probs."""
    if isinstance(output, tuple):  # KTO: (completion, mismatched)
        return [[float(output[0][i]), float(output[1][i])] for i in range(rows)]
    corrupted = output.corrupted
    return [[float(output.chosen[i]), float(output.rejected[i]), float(output.chosen_lengths[i]),
             float(output.rejected_lengths[i]), math.nan if corrupted is None else float(corrupted[i])]
            for i in range(rows)]


def stack_values(values: list[list[float]]):
    """Per-row lists of one micro-batch -> what the objective takes (PairLogps, or KTO's pair)."""
    from vlrlhf.training import PairLogps

    columns = list(zip(*values, strict=True))
    if len(columns) == 2:
        return torch.tensor(columns[0]), torch.tensor(columns[1])
    corrupted = None if math.isnan(columns[4][0]) else torch.tensor(columns[4])
    return PairLogps(torch.tensor(columns[0]), torch.tensor(columns[1]), torch.tensor(columns[2]).long(),
                     torch.tensor(columns[3]).long(), corrupted)


def reference_for_share(policy, share, micro_batches: list, chunks: list, values: list | None):
    """Reference log-probs for a policy worker's share: from the pipeline's column or the
    precomputed table (`values`), from a reference model in this process (`local`), or from
    the policy with its adapters disabled (`policy`); None for reference-free objectives."""
    if values is not None:
        out, start = [], 0
        for chunk in chunks:
            out.append(stack_values(values[start:start + len(chunk)]))
            start += len(chunk)
        return out
    if share.reference == "policy":
        return policy.logprobs(micro_batches)
    if share.reference == "local":
        if getattr(policy, "local_reference", None) is None:  # loaded once, beside the policy
            policy.local_reference = ReferenceWorker(policy.model_spec, share.reference_path)
        return policy.local_reference.logprobs(micro_batches)
    return None


class ReferenceStage:
    """Ray Data actor-pool stage (one reference model per actor): adds the `reference`
    column to encoded rows, micro-batch by micro-batch, ahead of the policy."""

    def __init__(self, model: ModelSpec, path: str | None, micro_batch_size: int):
        self.worker = ReferenceWorker(model, path)
        self.micro_batch_size = micro_batch_size

    def __call__(self, batch: dict) -> dict:
        import pickle

        import numpy as np

        from vlrlhf.data.pipeline import collate_items

        kept = [index for index, payload in enumerate(batch["payload"]) if payload]  # empty: failed to encode
        items = [pickle.loads(batch["payload"][index]) for index in kept]
        values = []
        for start in range(0, len(items), self.micro_batch_size):
            chunk = items[start:start + self.micro_batch_size]
            (output,) = self.worker.logprobs([collate_items(self.worker.adapter, chunk)])
            values += row_values(output, len(chunk))
        column = [[] for _ in batch["payload"]]  # empty: a held-out record that failed to encode
        for index, value in zip(kept, values, strict=True):
            column[index] = value
        # Python lists of floats become an Arrow list<double> (NumPy arrays would become a tensor type)
        batch["reference"] = np.array(column + [None], dtype=object)[:-1]
        return batch

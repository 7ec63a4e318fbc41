"""DAPO's dynamic sampling (`online.dynamic_sampling`, grpo and rloo).

Under a group baseline, a group whose rewards are all equal has zero advantages and no
gradient: a step where most prompts are solved (or failed) by every sample trains on a
few groups. DAPO (Yu et al., 2025, section 3.2) over-samples and filters: the step keeps
sampling further prompts of the seeded order until it holds prompts_per_step groups
whose rewards differ, then trains on the first prompts_per_step of them in prompt
order. Here the rollouts stop after `max_rounds` (the first included) and the step trains
on what it found. The prompts of every round are consumed (the order and resume point
move past them), and each round draws with a seed of its own, so a resumed run repeats
the uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import torch

from actors.rollout import RolloutResult


def informative(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(groups,) True where a group's n rewards are not all equal."""
    groups = scores.view(-1, n)
    return ~(groups == groups[:, :1]).all(dim=1)


def selected(scores: torch.Tensor, n: int, wanted: int) -> torch.Tensor:
    """(groups,) the first `wanted` informative groups, in prompt order."""
    useful = informative(scores, n)
    return useful & (useful.long().cumsum(0) <= wanted)


def merged(first: RolloutResult, rows: list, second: RolloutResult, more_rows: list) -> tuple[RolloutResult, list]:
    """One step's result from two rollouts: the second's prompts follow the first's (its
    samples' and rows' prompt indices shifted past them)."""
    offset = len(first.records)
    samples = first.samples + [dataclasses.replace(s, request=s.request + offset) for s in second.samples]
    shifted = [dataclasses.replace(row, request=row.request + offset) for row in more_rows]
    result = RolloutResult(samples, first.records + second.records, max(first.last_key, second.last_key),
                           first.prompts + second.prompts)
    return result, rows + shifted


def merged_metrics(first: dict, count: int, second: dict, more: int) -> dict:
    """The scoring metrics of two rounds: failure counts add up, means are over all samples."""
    out = {}
    for key in first.keys() | second.keys():
        a, b = first.get(key, 0.0), second.get(key, 0.0)
        if key.startswith("train/reward_failures/"):
            out[key] = a + b
        else:
            out[key] = (a * count + b * more) / (count + more)
    return out

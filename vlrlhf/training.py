"""One micro-batch of each offline objective: model forward -> loss and metric sums.

Losses come back as SUMS over the micro-batch divided by the caller's `normaliser`
(the global batch's pair count, or token count for token-mean SFT), so that gradient
accumulation and data parallelism reproduce the single large batch exactly: the
gradients of all micro-batches on all workers add up to the gradient of the global
mean. Metrics come back as sums with a count, for the same reason.
"""

from __future__ import annotations

import dataclasses

import torch

from vlrlhf.config import AlgorithmSpec
from vlrlhf.data.pipeline import KTOBatch, PairBatch
from vlrlhf.losses.ddpo import weighted_sequence_logps
from vlrlhf.losses.preference import (BATCH_LEVEL, BatchStatistics, RunningMean, batch_statistics, dpo_loss,
                                     kto_loss, kto_reference_point, mdpo_loss, normalise_loss_types)
from vlrlhf.losses.sft import sft_loss
from vlrlhf.models.batch import ModelBatch
from vlrlhf.models.logprobs import sequence_logprobs


@dataclasses.dataclass
class PairLogps:
    """Per-pair summed log-probs and lengths, (B,) each."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    corrupted: torch.Tensor | None = None  # mDPO: the chosen answer given corrupted images

    def cpu(self) -> PairLogps:
        return PairLogps(*(None if value is None else value.detach().cpu()
                           for value in dataclasses.astuple(self)))


def sequence_logps(adapter, model, batch: ModelBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed log-probs of the labels and (B,) label counts. With DDPO token weights
    the score is RLHF-V's weighted mean sum(w lp) / sum(w) instead of the sum."""
    return score_tokens(adapter.token_logprobs(model, batch), batch)


def score_tokens(token_logps: torch.Tensor, batch: ModelBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token log-probs of `batch` -> sequence_logps' (B,) scores and (B,) label counts."""
    mask = batch.loss_mask
    if batch.label_weights is not None:
        return weighted_sequence_logps(token_logps, mask, batch.label_weights), mask.sum(-1)
    return sequence_logprobs(token_logps, mask), mask.sum(-1)


def pair_logps(adapter, model, pairs: PairBatch) -> PairLogps:
    """Chosen and rejected rows in one preference forward (adapter.pair_token_logprobs: each
    pair's images and prompt go through the model once); mDPO's corrupted rows, whose
    images differ, in a forward of their own."""
    chosen_tokens, rejected_tokens = adapter.pair_token_logprobs(model, pairs.chosen, pairs.rejected)
    c, chosen_lengths = score_tokens(chosen_tokens, pairs.chosen)
    r, rejected_lengths = score_tokens(rejected_tokens, pairs.rejected)
    corrupted = sequence_logps(adapter, model, pairs.corrupted)[0] if pairs.corrupted is not None else None
    return PairLogps(c, r, chosen_lengths, rejected_lengths, corrupted)


def move_pairs(pairs: PairBatch, device) -> PairBatch:
    """On `device`, the pixels chosen and rejected share moved once."""
    moved = {}
    return PairBatch(pairs.chosen.to(device, moved=moved), pairs.rejected.to(device, moved=moved),
                     None if pairs.corrupted is None else pairs.corrupted.to(device, moved=moved))


def dpo_micro_step(adapter, model, pairs: PairBatch, reference: PairLogps | None, algorithm: AlgorithmSpec,
                   normaliser: float,
                   statistics: BatchStatistics | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`statistics`: this micro-batch's share of the step's global batch (dpo_step_statistics),
    for the batch-level loss types; None when none is used."""
    policy = pair_logps(adapter, model, pairs)
    device = policy.chosen.device
    ref_c = reference.chosen.to(device) if reference is not None else None
    ref_r = reference.rejected.to(device) if reference is not None else None
    options = dict(loss_type=algorithm.loss_type, beta=algorithm.beta, label_smoothing=algorithm.label_smoothing,
                   chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
                   gamma=algorithm.gamma)
    if algorithm.mdpo is not None:
        if reference is None or reference.corrupted is None or policy.corrupted is None:
            raise ValueError("mDPO needs corrupted-image rows and a reference (algorithm.mdpo)")
        out = mdpo_loss(policy.chosen, policy.rejected, ref_c, ref_r, policy.corrupted,
                        reference.corrupted.to(device), anchor=algorithm.mdpo.anchor,
                        image_weight=algorithm.mdpo.image_weight, anchor_weight=algorithm.mdpo.anchor_weight,
                        **options)
    else:
        out = dpo_loss(policy.chosen, policy.rejected, ref_c, ref_r, statistics=statistics, **options)
    loss = out.losses.sum() / normaliser
    margin = out.chosen_rewards - out.rejected_rewards
    sums = {"loss_sum": out.losses.detach().sum(), "reward_accuracy_sum": (margin > 0).float().sum(),
            "reward_margin_sum": margin.sum(), "chosen_reward_sum": out.chosen_rewards.sum(),
            "rejected_reward_sum": out.rejected_rewards.sum(), "chosen_logp_sum": policy.chosen.detach().sum()}
    if algorithm.mdpo is not None:
        sums |= {"image_loss_sum": out.terms["image"].detach().sum(),
                 "anchor_loss_sum": out.terms["anchor"].detach().sum()}
    return loss, {"count": len(margin), **host_numbers(sums)}


def host_numbers(values: dict) -> dict[str, float]:
    """Scalars (0-d tensors on the model's device, or numbers) as Python floats, with one copy to
    the host: one synchronisation per micro-batch instead of one per metric."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
        out |= dict(zip(tensors, stacked, strict=True))
    return out


def sft_micro_step(adapter, model, batch: ModelBatch, algorithm: AlgorithmSpec,
                   normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
    token_logps = adapter.token_logprobs(model, batch)
    mask = batch.loss_mask
    token_mean = algorithm.sft_aggregation == "token-mean"
    if token_mean:  # normaliser: label tokens in the global batch
        total = -(token_logps * mask).sum()
    else:  # a sum of per-sequence terms; normaliser: sequences in the global batch
        total = sft_loss(token_logps, mask, algorithm.sft_aggregation) * len(batch)
    loss = total / normaliser
    metrics = {"loss_sum": float(total.detach()), "count": float(mask.sum()) if token_mean else len(batch),
               "examples": len(batch)}
    return loss, metrics


def kto_micro_step(adapter, model, batch: KTOBatch, reference: tuple[torch.Tensor, torch.Tensor],
                   algorithm: AlgorithmSpec, normaliser: float,
                   reference_point: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """`reference_point`: KTO's z_ref of the step's global batch (kto_step_reference_point)."""
    policy_logps, _ = sequence_logps(adapter, model, batch.completions)
    desirable = batch.desirable
    ref_logps = reference[0].to(policy_logps.device)
    out = kto_loss(policy_logps, ref_logps, desirable.to(policy_logps.device), reference_point=reference_point,
                   beta=algorithm.beta, desirable_weight=algorithm.desirable_weight,
                   undesirable_weight=algorithm.undesirable_weight)
    loss = out.losses.sum() / normaliser
    good = desirable.bool().to(out.rewards.device)
    metrics = {"loss_sum": float(out.losses.detach().sum()), "count": len(good), "kl_sum": float(out.kl) * len(good),
               "desirable_reward_sum": float(out.rewards[good].sum()), "desirable_count": float(good.sum()),
               "undesirable_reward_sum": float(out.rewards[~good].sum()), "undesirable_count": float((~good).sum())}
    return loss, metrics


# ---------------------------------------------------------------- whole-step statistics
# Some objectives need a statistic of the step's GLOBAL batch before any micro-batch's loss:
# KTO's reference point, BCO's delta, AOT's ranks. A no-grad pass over this worker's
# micro-batches computes the per-example inputs; `gather(values) -> (all, offset)`
# concatenates every worker's (n, k) rows in rank order (the global batch's order) and says
# where this worker's rows start ((values, 0) for one worker). The statistic is then the same
# whatever the micro-batch size and worker count.

@torch.no_grad()
def kto_step_reference_point(adapter, model, micro_batches: list[KTOBatch], references: list, device,
                             gather) -> torch.Tensor:
    """() z_ref from every mismatched pair of the step (kto_reference_point on the global batch)."""
    kl_policy = torch.cat([sequence_logps(adapter, model, micro.mismatched.to(device))[0].float()
                           for micro in micro_batches])
    kl_ref = torch.cat([ref[1].float() for ref in references]).to(kl_policy.device)
    gathered, _ = gather(torch.stack([kl_policy, kl_ref], dim=1))
    return kto_reference_point(*gathered.unbind(1))


def uses_batch_statistics(algorithm: AlgorithmSpec) -> bool:
    return algorithm.name == "dpo" and any(t in BATCH_LEVEL for t in normalise_loss_types(algorithm.loss_type))


@torch.no_grad()
def dpo_step_statistics(adapter, model, micro_batches: list[PairBatch], references: list, algorithm: AlgorithmSpec,
                        device, gather, baseline: RunningMean, train: bool = True) -> list[BatchStatistics]:
    """One BatchStatistics share per micro-batch, from batch_statistics on the global batch.
    Training folds BCO's rewards into the job's `baseline` (every worker folds the same
    gathered rewards, so the workers' baselines agree); evaluation uses it as it stands."""
    if any(ref is None for ref in references):
        raise ValueError(f"loss_type {algorithm.loss_type!r} needs reference log-probs (reference.mode)")
    scored = [pair_logps(adapter, model, move_pairs(micro, device)) for micro in micro_batches]
    local = [torch.cat([getattr(s, name).float() for s in scored]) for name in ("chosen", "rejected")]
    local += [torch.cat([getattr(ref, name).float() for ref in references]).to(local[0].device)
              for name in ("chosen", "rejected")]
    gathered, start = gather(torch.stack(local, dim=1))  # (N, 4) over every worker
    pi_c, pi_r, ref_c, ref_r = gathered.unbind(1)
    statistics = batch_statistics(pi_c, pi_r, ref_c, ref_r, loss_type=algorithm.loss_type, beta=algorithm.beta,
                                  baseline=baseline, fold=train)
    shares = []
    for s in scored:
        shares.append(statistics.select(start, start + len(s.chosen)))
        start += len(s.chosen)
    return shares


def finish_metrics(sums: list[dict[str, float]]) -> dict[str, float]:
    """Add up metric sums from micro-batches/workers and turn *_sum into means."""
    total: dict[str, float] = {}
    for item in sums:
        for key, value in item.items():
            total[key] = total.get(key, 0.0) + value
    out = {}
    for key, value in total.items():
        if key.endswith("_sum"):
            name = key[: -len("_sum")]
            # desirable_reward / undesirable_reward have their own counts
            denominator = total.get(name.split("_")[0] + "_count", total.get("count", 0.0))
            out[name] = value / denominator if denominator else 0.0
    out["examples"] = total.get("examples", total.get("count", 0.0))
    return out


@dataclasses.dataclass
class RLBatch:
    """Prompt + sampled completion rows for a policy-gradient step."""

    batch: ModelBatch  # labels = the completion tokens
    old_logps: torch.Tensor  # (B, T) behaviour log-probs at the label positions, 0 elsewhere
    advantages: torch.Tensor  # (B,) one per completion, or (B, T) per token at the label positions
    ref_logps: torch.Tensor | None = None  # (B, T) reference log-probs, for a KL in the loss (GRPO, RLOO)
    # rows answering the same prompt (row indices), and one collated row per group for the
    # images: the group forward runs each group's image and prompt once (vlrlhf.models.groups)
    groups: list[list[int]] | None = None
    representatives: ModelBatch | None = None
    # the sampling temperature: the rows are scored under softmax(logits / temperature), the
    # distribution the engines sampled them from (and scored their behaviour log-probs under)
    temperature: float = 1.0

    def to(self, device) -> RLBatch:
        return RLBatch(self.batch.to(device), self.old_logps.to(device), self.advantages.to(device),
                       None if self.ref_logps is None else self.ref_logps.to(device), self.groups,
                       None if self.representatives is None else self.representatives.to(device), self.temperature)

    def logprobs(self, adapter, model) -> tuple[torch.Tensor, bool]:
        """(B, T) rollout log-probs of the rows under `model` and whether the group forward ran."""
        return adapter.group_rollout_logprobs(model, self.batch, self.groups, self.representatives,
                                              temperature=self.temperature)


def rl_micro_step(adapter, model, rl: RLBatch, ref_logps: torch.Tensor | None, online,
                  normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip surrogate (+ kl_coef * k3 KL to the reference, when reference log-probs are
    given here or in the batch) summed over completion tokens, divided by the global
    completion-token count `normaliser` (token-mean over the step)."""
    from vlrlhf.losses.policy import kl_estimate, ppo_policy_loss

    ref_logps = ref_logps if ref_logps is not None else rl.ref_logps
    logps, packed = rl.logprobs(adapter, model)
    mask = rl.batch.loss_mask
    advantages = rl.advantages[:, None].expand_as(logps) if rl.advantages.dim() == 1 else rl.advantages
    out = ppo_policy_loss(logps, rl.old_logps, advantages, mask, clip_low=online.clip_low,
                          clip_high=online.clip_high, aggregation="seq-mean-token-sum",
                          sequence_ratio=online.importance_ratio == "sequence")
    total = out.loss * len(rl.batch)  # the token sum
    tokens = mask.sum().float()
    sums = {"policy_loss_sum": total.detach(), "tokens": tokens, "count": tokens,
            "clip_fraction_sum": torch.as_tensor(out.clip_fraction, device=tokens.device) * tokens,
            "ratio_sum": (torch.exp(logps.detach() - rl.old_logps) * mask).sum(),
            "approx_kl_sum": torch.as_tensor(out.approx_kl, device=tokens.device) * tokens,
            # the share of rows scored in a group forward (*_count: its own denominator)
            "packed_share_sum": float(len(rl.batch)) if packed else 0.0, "packed_count": float(len(rl.batch))}
    if ref_logps is not None and online.kl_coef > 0:
        kl = (kl_estimate(logps, ref_logps.to(logps.device), online.kl_estimator or "k3") * mask).sum()
        total = total + online.kl_coef * kl
        sums["kl_sum"] = kl.detach()
    sums["loss_sum"] = total.detach()
    return total / normaliser, host_numbers(sums)


@dataclasses.dataclass
class ValueBatch:
    """Prompt + completion rows for a critic step (PPO)."""

    batch: ModelBatch  # labels = the completion tokens
    old_values: torch.Tensor  # (B, T) the critic's values at rollout time, at the label positions
    returns: torch.Tensor  # (B, T) GAE returns, the regression targets
    groups: list[list[int]] | None = None  # as RLBatch's
    representatives: ModelBatch | None = None

    def to(self, device) -> ValueBatch:
        return ValueBatch(self.batch.to(device), self.old_values.to(device), self.returns.to(device), self.groups,
                          None if self.representatives is None else self.representatives.to(device))


def value_micro_step(adapter, model, head, vb: ValueBatch, clip: float | None,
                     normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss summed over completion tokens / the global token count."""
    from vlrlhf.losses.policy import value_loss
    from vlrlhf.models.value_head import token_values

    values = token_values(adapter, model, head, vb.batch, vb.groups, vb.representatives)
    mask = vb.batch.loss_mask
    out = value_loss(values, vb.old_values, vb.returns, mask, clip=clip)
    tokens = float(mask.sum())
    total = out.loss * tokens
    error = ((values.detach() - vb.returns) * mask).pow(2).sum()
    return total / normaliser, {"value_loss_sum": float(total.detach()), "count": tokens,
                                "value_clip_fraction_sum": float(out.clip_fraction) * tokens,
                                "value_mse_sum": float(error), "value_sum": float((values.detach() * mask).sum())}


def reward_micro_step(adapter, model, head, pairs: PairBatch, algorithm: AlgorithmSpec,
                      normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-model training: Bradley-Terry on the scores at each row's last real token."""
    from vlrlhf.losses.preference import bradley_terry_loss
    from vlrlhf.models.value_head import pair_last_token_scores

    chosen, rejected = pair_last_token_scores(adapter, model, head, pairs.chosen, pairs.rejected)
    losses = bradley_terry_loss(chosen, rejected, center_coef=algorithm.center_coef)
    margin = (chosen - rejected).detach()
    return losses.sum() / normaliser, {
        "loss_sum": float(losses.detach().sum()), "count": len(margin),
        "reward_accuracy_sum": float((margin > 0).float().sum()), "reward_margin_sum": float(margin.sum()),
        "chosen_reward_sum": float(chosen.detach().sum()), "rejected_reward_sum": float(rejected.detach().sum())}

"""Policy-gradient objectives: advantages, PPO-clip, value loss and KL terms.

Shapes: per-token tensors are (B, T) over generated tokens, with `mask` (B, T)
marking real response tokens (padding anywhere is skipped); per-sample tensors are
(N,). Groups (GRPO, RLOO) are contiguous: samples [k*G, (k+1)*G) share a prompt.
"""

from __future__ import annotations

import dataclasses

import torch

from vlrlhf.losses.aggregation import aggregate, check_same_shape, upcast

KL_KINDS = ("k1", "k2", "k3")
# exp() of log-ratios beyond this is clamped (k3): finite for gaps up to +-1e3 and more.
MAX_LOG_RATIO = 20.0


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL").

    With log r = ref_logps - logps:
      k1 = -log r                 unbiased, high variance, can be negative
      k2 = (log r)^2 / 2          biased, low variance, >= 0
      k3 = (r - 1) - log r        unbiased, low variance, >= 0; log r clamped to +-20 in exp
    """
    check_same_shape(logps=logps, ref_logps=ref_logps)
    log_r = upcast(ref_logps) - upcast(logps)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.exp(log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)) - 1 - log_r
    raise ValueError(f"kind={kind!r} is not one of {', '.join(KL_KINDS)}")


def kl_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
               kl_coef: float, kind: str = "k1") -> torch.Tensor:
    """KL in the reward (PPO, RLOO, REINFORCE++): (B, T) token rewards
    r_t = -kl_coef * kl_t on response tokens, plus the sequence score (B,) on the last one."""
    check_same_shape(logps=logps, ref_logps=ref_logps, mask=mask)
    if scores.shape != (logps.shape[0],):
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected ({logps.shape[0]},)")
    mask = mask.bool()
    rewards = -kl_coef * kl_estimate(logps, ref_logps, kind) * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += upcast(scores)[has_tokens]
    return rewards


def kl_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kind: str = "k3",
            aggregation: str = "token-mean", norm_length: float | None = None) -> torch.Tensor:
    """KL in the loss (GRPO): aggregate(kl_t) over the mask; add kl_coef * this to the policy loss."""
    return aggregate(kl_estimate(logps, ref_logps, kind), mask, aggregation, norm_length)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman+ 2016). Returns (advantages, returns), (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}, where t+1 is
    the next masked token (V = 0 and A = 0 after the last). returns = A + V. Masked-out
    positions get 0 and do not break the recursion.
    """
    check_same_shape(rewards=rewards, values=values, mask=mask)
    rewards, values, mask = upcast(rewards), upcast(values), mask.float()
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[0])
    next_advantage = rewards.new_zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        next_value = m * values[:, t] + (1 - m) * next_value
        next_advantage = m * advantage + (1 - m) * next_advantage
    return advantages, (advantages + values) * mask


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the {rewards.numel()} rewards")
    return upcast(rewards).view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao+ 2024): A_i = (r_i - mean_group) / (std + eps), (N,) -> (N,).

    scale="group": std of the group (unbiased, as GRPO); "batch": std of all N rewards;
    "none": no scaling (Dr. GRPO, Liu+ 2025). A group of equal rewards gives 0.
    """
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (grouped.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale={scale!r} is not one of group, batch, none")
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian+ 2024): A_i = r_i - mean_{j != i} r_j over the other samples of the group."""
    grouped = _grouped(rewards, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries of the whole batch; 0 off the mask."""
    mask = mask.float()
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            group_size: int | None = None) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): discounted returns-to-go, whitened over the global batch.

    G_t = sum_{k >= t} gamma^(k-t) r_k over masked tokens; A = whiten(G) over all masked
    tokens of the batch. With `group_size` (REINFORCE++-baseline) the group mean of the
    sequences' total rewards is subtracted from each sequence's last-token reward first.
    """
    check_same_shape(token_rewards=token_rewards, mask=mask)
    rewards = upcast(token_rewards) * mask.float()
    if group_size is not None:
        totals = rewards.sum(dim=1)
        baseline = _grouped(totals, group_size).mean(dim=1).repeat_interleave(group_size)
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, -1).amax(dim=1)
        rows = torch.nonzero(last >= 0).squeeze(1)
        rewards = rewards.clone()
        rewards[rows, last[rows]] -= baseline[rows]
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    m = mask.float()
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = m[:, t] * (rewards[:, t] + gamma * running) + (1 - m[:, t]) * running
        returns[:, t] = running * m[:, t]
    return whiten(returns, mask)


@dataclasses.dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # () aggregated clipped surrogate loss
    clip_fraction: torch.Tensor  # () share of masked tokens where the clipped term was active
    approx_kl: torch.Tensor  # () token-mean of k3(old || new), a step-size diagnostic


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                    aggregation: str = "token-mean", norm_length: float | None = None,
                    sequence_ratio: bool = False) -> PolicyLossOutput:
    """PPO-clip (Schulman+ 2017) with asymmetric bounds (DAPO's clip-higher) and dual clip.

    ratio = exp(logps - old_logps); l_t = max(-A ratio, -A clip(ratio, 1-clip_low, 1+clip_high));
    dual clip (Ye+ 2020, c = dual_clip > 1): for A < 0, l_t = min(l_t, -c A).
    Aggregated over the mask by `aggregation` (vlrlhf.losses.aggregation).

    sequence_ratio (GSPO, Zheng+ 2025): one ratio per sequence, the geometric mean of its
    tokens' ratios, s_i = exp(mean_t (logps - old_logps)), clipped as a whole (the paper's
    bounds are 3e-4 / 4e-4). Every token carries s_i, built as GSPO-token's
    sg[s_i] * pi(y_t) / sg[pi(y_t)]: with the sequence's advantage on its tokens and a mean
    over them, the gradient is the paper's A_i * grad s_i.
    """
    check_same_shape(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low={clip_low} and clip_high={clip_high} must be >= 0")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip={dual_clip} must be > 1")
    log_ratio = (upcast(logps) - upcast(old_logps)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if sequence_ratio:
        maskf = mask.float()
        sequence = (log_ratio * maskf).sum(dim=1) / maskf.sum(dim=1).clamp(min=1)
        ratio = torch.exp(sequence.detach()[:, None] + upcast(logps) - upcast(logps).detach())
    else:
        ratio = torch.exp(log_ratio)
    advantages = upcast(advantages)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        losses = torch.where(advantages < 0, torch.minimum(losses, -dual_clip * advantages), losses)
    maskf = mask.float()
    count = maskf.sum().clamp(min=1)
    clip_fraction = ((clipped > unclipped).float() * maskf).sum() / count
    approx_kl = ((torch.exp(-log_ratio) - 1 + log_ratio) * maskf).sum().detach() / count
    return PolicyLossOutput(aggregate(losses, mask, aggregation, norm_length), clip_fraction.detach(), approx_kl)


@dataclasses.dataclass
class ValueLossOutput:
    loss: torch.Tensor  # () 1/2 token-mean of the (clipped) squared error
    clip_fraction: torch.Tensor  # () share of masked tokens where the clipped error was larger


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, aggregation: str = "token-mean") -> ValueLossOutput:
    """PPO value loss: 1/2 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -c, c).
    `clip=None` gives the plain 1/2 (V - R)^2."""
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    values, old_values, returns = upcast(values), upcast(old_values), upcast(returns)
    error = (values - returns) ** 2
    if clip is None:
        losses, clipped_more = error, torch.zeros_like(error)
    else:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped_error = (clipped - returns) ** 2
        losses, clipped_more = torch.maximum(error, clipped_error), (clipped_error > error).float()
    maskf = mask.float()
    fraction = (clipped_more * maskf).sum() / maskf.sum().clamp(min=1)
    return ValueLossOutput(0.5 * aggregate(losses, mask, aggregation), fraction.detach())

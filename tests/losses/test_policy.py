"""Policy-gradient math: advantages, PPO-clip, value loss, KL terms and SFT."""

from __future__ import annotations

import math

import pytest
import torch

from vlrlhf.losses.aggregation import aggregate
from vlrlhf.losses.policy import (gae, group_advantages, kl_estimate, kl_loss, kl_rewards, ppo_policy_loss,
                                  reinforce_pp_advantages, rloo_advantages, value_loss, whiten)
from vlrlhf.losses.sft import sft_loss


def test_kl_estimators_hand_computed():
    logps = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])  # log r = ref - logp = [-0.5, 1.0]
    assert kl_estimate(logps, ref, "k1")[0].tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate(logps, ref, "k2")[0].tolist() == pytest.approx([0.125, 0.5])
    assert kl_estimate(logps, ref, "k3")[0].tolist() == pytest.approx(
        [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    with pytest.raises(ValueError, match="kind='k4'"):
        kl_estimate(logps, ref, "k4")


def test_k3_is_unbiased_for_the_true_kl():
    # Categorical p, q: E_{x~p}[k3] = KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum()
    k3 = kl_estimate(p.log(), q.log(), "k3")
    k1 = kl_estimate(p.log(), q.log(), "k1")
    assert (p * k3).sum().item() == pytest.approx(true_kl.item())
    assert (p * k1).sum().item() == pytest.approx(true_kl.item())


def test_kl_rewards_put_the_score_on_the_last_token():
    logps = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = kl_rewards(torch.tensor([1.0, 2.0]), logps, ref, mask, kl_coef=0.1, kind="k1")
    # k1 = logp - ref: [0.5, 0, -0.5], [0, -1, -]
    want = [[-0.05, 0.0, 0.05 + 1.0], [0.0, 0.1 + 2.0, 0.0]]
    assert rewards.tolist() == [pytest.approx(row) for row in want]


def test_kl_loss_is_the_aggregated_estimate():
    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    mask = torch.tensor([[1, 1]])
    assert kl_loss(logps, ref, mask, "k2").item() == pytest.approx((0.125 + 0.5) / 2)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv.tolist() == [pytest.approx([a0, a1, a2])]
    assert ret.tolist() == [pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])]


def test_gae_with_lambda_and_gamma_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[2, :2] = 0  # left padding too
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = rewards * mask
    to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, (to_go - values) * mask)


def test_gae_is_invariant_to_extra_padding():
    rewards, values, mask = torch.tensor([[0.1, 0.2, 1.0]]), torch.tensor([[0.3, 0.2, 0.1]]), torch.ones(1, 3)
    adv, _ = gae(rewards, values, mask, 0.99, 0.95)
    padded, _ = gae(torch.cat([rewards, torch.zeros(1, 2)], 1), torch.cat([values, torch.ones(1, 2)], 1),
                    torch.cat([mask, torch.zeros(1, 2)], 1), 0.99, 0.95)
    torch.testing.assert_close(padded[:, :3], adv)
    assert padded[:, 3:].abs().sum() == 0


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    got = group_advantages(rewards, 4, scale="group", eps=1e-6)
    std += 1e-6
    assert got[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert got[4:].tolist() == [0.0] * 4  # equal rewards: zero advantage
    assert group_advantages(rewards, 4, scale="none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    batch_std = rewards.std().item()
    assert group_advantages(rewards, 4, scale="batch", eps=0.0)[0].item() == pytest.approx(0.5 / batch_std)


def test_rloo_baseline_excludes_the_sample_itself():
    rewards = torch.tensor([1.0, 2.0, 6.0])
    assert rloo_advantages(rewards, 3).tolist() == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5])
    assert rloo_advantages(torch.full((4,), 3.0), 2).tolist() == [0.0] * 4


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages])
def test_group_size_errors(fn):
    with pytest.raises(ValueError, match="group_size=3 must be >= 2 and divide the 4 rewards"):
        fn(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="group_size=1"):
        fn(torch.zeros(4), 1)


def test_reinforce_pp_returns_then_global_whitening():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gamma = 0.5
    returns = [[0.25, 0.5, 1.0], [1.0, 2.0]]
    flat = returns[0] + returns[1]
    mean = sum(flat) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 5)
    got = reinforce_pp_advantages(rewards, mask, gamma)
    want = [[(x - mean) / std for x in returns[0]], [(x - mean) / std for x in returns[1]] + [0.0]]
    assert got.tolist() == [pytest.approx(row, abs=1e-5) for row in want]


def test_reinforce_pp_group_baseline_subtracts_the_group_mean_score():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0], [5.0, 0.0], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]])
    got = reinforce_pp_advantages(rewards, mask, 1.0, group_size=2)
    # group means 2 and 3, subtracted at each sequence's last token: returns [-1,-1], [1,1], [2], [-2]
    flat = torch.tensor([-1.0, -1.0, 1.0, 1.0, 2.0, -2.0])
    want = whiten(torch.tensor([[-1.0, -1.0], [1.0, 1.0], [2.0, 0.0], [-2.0, 0.0]]), mask)
    torch.testing.assert_close(got, want)
    assert (got[mask.bool()] * flat.std(unbiased=False) + 0).sum().abs() < 1e-5  # zero mean


def ppo_reference(logp, old, adv, clip_low, clip_high, dual=None):
    ratio = math.exp(logp - old)
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - clip_low), 1 + clip_high))
    if dual is not None and adv < 0:
        loss = min(loss, -dual * adv)
    return loss


def test_ppo_policy_loss_hand_computed_with_clip_higher_and_dual_clip():
    logps = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(4.0)]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -2.0, 0.5, -1.0]])
    mask = torch.ones(1, 4)
    out = ppo_policy_loss(logps, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    per_token = [ppo_reference(math.log(r), 0.0, a, 0.2, 0.28, 3.0) for r, a in
                 [(1.5, 1.0), (0.5, -2.0), (1.1, 0.5), (4.0, -1.0)]]
    # token 0: -1*min(1.5, 1.28) = -1.28; token 1: max(1.0, 1.6) = 1.6; token 2: -0.55; token 3: min(4, 3) = 3
    assert per_token == pytest.approx([-1.28, 1.6, -0.55, 3.0])
    assert out.loss.item() == pytest.approx(sum(per_token) / 4)
    assert out.clip_fraction.item() == pytest.approx(2 / 4)  # tokens 0 and 1 are clipped


def test_ratio_one_gives_minus_mean_advantage():
    adv = torch.tensor([[1.0, -3.0, 2.0]])
    out = ppo_policy_loss(torch.full((1, 3), -2.0), torch.full((1, 3), -2.0), adv, torch.ones(1, 3))
    assert out.loss.item() == pytest.approx(0.0) and out.clip_fraction.item() == 0.0
    assert out.approx_kl.item() == 0.0


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                         "seq-mean-token-sum-norm"])
def test_aggregations_hand_computed_and_invariant_to_padding(aggregation):
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    want = {"token-mean": 10 / 4, "seq-mean-token-sum": (6 + 4) / 2, "seq-mean-token-mean": (2 + 4) / 2,
            "seq-mean-token-sum-norm": 10 / (2 * 8)}[aggregation]
    assert aggregate(values, mask, aggregation, norm_length=8).item() == pytest.approx(want)
    padded_values = torch.cat([values, torch.full((2, 5), 7.0)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    assert aggregate(padded_values, padded_mask, aggregation, norm_length=8).item() == pytest.approx(want)
    # the PPO loss with these per-token losses (ratio 1: loss = -A) aggregates the same way
    loss = ppo_policy_loss(torch.zeros(2, 8), torch.zeros(2, 8), -padded_values, padded_mask,
                           aggregation=aggregation, norm_length=8).loss
    assert loss.item() == pytest.approx(want)


def test_empty_masks_are_defined_as_zero():
    values, mask = torch.ones(2, 3), torch.zeros(2, 3)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        assert aggregate(values, mask, mode).item() == 0.0
    out = ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), mask)
    assert out.loss.item() == 0.0 and out.clip_fraction.item() == 0.0
    assert sft_loss(torch.full((2, 3), -1.0), mask).item() == 0.0
    assert kl_rewards(torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.1).abs().sum() == 0


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0]])
    out = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: V_clip = 0.7, max((1-2)^2, (0.7-2)^2) = 1.69; token 1: V_clip = 0.3, max(0, 0.09) = 0.09
    assert out.loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert out.clip_fraction.item() == pytest.approx(1.0)
    plain = value_loss(values, old, returns, torch.ones(1, 2), clip=None)
    assert plain.loss.item() == pytest.approx(0.5 * (1.0 + 0.0) / 2)


def test_sft_loss_is_token_nll():
    logps = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(logps, mask).item() == pytest.approx(6 / 3)
    assert sft_loss(logps, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 2) / 2)


def test_bad_arguments_name_the_argument():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"old_logps has shape \(2, 4\)"):
        ppo_policy_loss(x, torch.zeros(2, 4), x, x)
    with pytest.raises(ValueError, match="aggregation='mean' is not one of"):
        ppo_policy_loss(x, x, x, x, aggregation="mean")
    with pytest.raises(ValueError, match="norm_length must be a positive constant"):
        ppo_policy_loss(x, x, x, x, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="dual_clip=0.5 must be > 1"):
        ppo_policy_loss(x, x, x, x, dual_clip=0.5)
    with pytest.raises(ValueError, match="scale='std'"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match=r"scores has shape \(3,\)"):
        kl_rewards(torch.zeros(3), x, x, x, 0.1)


def test_gradcheck_smooth_policy_functions():
    torch.manual_seed(0)
    logps = (torch.randn(2, 3, dtype=torch.float64) * 0.1).requires_grad_()
    old = torch.randn(2, 3, dtype=torch.float64) * 0.1
    adv = torch.randn(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # clip bounds wide enough to stay away from the kinks
    assert torch.autograd.gradcheck(lambda lp: ppo_policy_loss(lp, old, adv, mask, 5.0, 5.0).loss, (logps,))
    for kind in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda lp, k=kind: kl_loss(lp, old, mask, k), (logps,))
    assert torch.autograd.gradcheck(lambda lp: sft_loss(lp, mask), (logps,))
    values = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: value_loss(v, v.detach() + 5, adv, mask, clip=None).loss, (values,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_policy_functions_stay_finite_at_extremes(dtype):
    logps = torch.tensor([[-1e4, -1.0, 0.0], [-5.0, -1e3, -2.0]], dtype=dtype)
    ref = torch.tensor([[-1.0, -1e4, -1e3], [-5.0, 0.0, -2.0]], dtype=dtype)
    mask = torch.ones(2, 3)
    for kind in ("k1", "k2", "k3"):
        assert torch.isfinite(kl_estimate(logps, ref, kind)).all()
    out = ppo_policy_loss(logps, ref, torch.ones(2, 3, dtype=dtype), mask, dual_clip=3.0)
    assert torch.isfinite(out.loss) and torch.isfinite(out.approx_kl)
    assert torch.isfinite(kl_rewards(torch.ones(2, dtype=dtype), logps, ref, mask, 0.05, "k3")).all()
    assert torch.isfinite(reinforce_pp_advantages(logps, mask)).all()


def test_gspo_sequence_ratio_value_and_gradient_from_the_paper():
    """GSPO (Zheng+ 2025): s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), the objective per sequence
    min(s_i A_i, clip(s_i, 1 - eps_l, 1 + eps_h) A_i), its gradient A_i * s_i * mean_t grad log pi(y_t)
    where unclipped and 0 where clipped; padding takes no part."""
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    shift = torch.tensor([[0.3, -0.1, 0.1, 9.0], [0.0002, 0.0001, 0.0, 0.0]])  # last two of row 1: padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logps = (old + shift).requires_grad_()
    adv = torch.tensor([2.0, -1.0])[:, None].expand(2, 4)
    eps_low, eps_high = 3e-4, 4e-4
    out = ppo_policy_loss(logps, old, adv, mask, clip_low=eps_low, clip_high=eps_high,
                          aggregation="seq-mean-token-mean", sequence_ratio=True)
    s = [math.exp((0.3 - 0.1 + 0.1) / 3), math.exp((0.0002 + 0.0001) / 2)]  # geometric means of the ratios
    per_sequence = [max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
                    for r, a in zip(s, (2.0, -1.0), strict=True)]
    assert out.loss.item() == pytest.approx(sum(per_sequence) / 2, rel=1e-6)
    out.loss.backward()
    # row 0: s = 1.105 > 1 + eps_high with A > 0: clipped, no gradient; row 1: s = 1.00015 inside the bounds
    expected = torch.zeros(2, 4)
    advantage = -1.0
    expected[1, :2] = -advantage * s[1] / 2 / 2  # -(A * s / |y|) / (number of sequences)
    assert torch.allclose(logps.grad, expected, atol=1e-7)
    assert out.clip_fraction.item() == pytest.approx(3 / 5)  # row 0's three tokens


def test_gspo_equals_ppo_when_every_token_has_the_same_ratio():
    old = torch.zeros(2, 3)
    logps = torch.tensor([[0.1, 0.1, 0.1], [-0.2, -0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]])
    token = ppo_policy_loss(logps, old, adv, mask, clip_low=0.05, clip_high=0.2)
    sequence = ppo_policy_loss(logps, old, adv, mask, clip_low=0.05, clip_high=0.2, sequence_ratio=True)
    assert sequence.loss.item() == pytest.approx(token.loss.item(), rel=1e-6)
    assert sequence.clip_fraction.item() == pytest.approx(token.clip_fraction.item())

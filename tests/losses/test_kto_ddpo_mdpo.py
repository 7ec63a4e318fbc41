"""KTO, dense DPO (RLHF-V) and mDPO against hand-computed values and references."""

from __future__ import annotations

import math

import pytest
import torch

from vlrlhf.losses.ddpo import weighted_sequence_logps
from vlrlhf.losses.preference import dpo_loss, kto_loss, kto_reference_point, mdpo_loss


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------- KTO

def test_kto_hand_computed():
    policy = torch.tensor([-4.0, -6.0, -5.0])
    ref = torch.tensor([-5.0, -5.5, -5.0])  # r = [1.0, -0.5, 0.0]
    desirable = torch.tensor([True, False, True])
    kl_policy = torch.tensor([-7.0, -6.0, -9.0])
    kl_ref = torch.tensor([-7.5, -6.3, -8.9])  # mean(kl_p - kl_ref) = (0.5 + 0.3 - 0.1) / 3
    z = (0.5 + 0.3 - 0.1) / 3
    beta, wd, wu = 0.2, 1.0, 1.5
    out = kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    want = [wd * (1 - sig(beta * (1.0 - z))), wu * (1 - sig(beta * (z - (-0.5)))), wd * (1 - sig(beta * (0.0 - z)))]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-6)
    assert out.kl.item() == pytest.approx(z, abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.2, -0.1, 0.0], abs=1e-6)


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    policy = torch.tensor([-4.0, -6.0], requires_grad=True)
    kl_policy = torch.tensor([-9.0, -9.0], requires_grad=True)
    out = kto_loss(policy, torch.tensor([-4.0, -6.0]), torch.tensor([1, 0]), kl_policy,
                   torch.tensor([-5.0, -5.0]), beta=0.1)
    assert out.kl.item() == 0.0  # mean KL estimate -4 < 0 -> 0
    assert out.losses.tolist() == pytest.approx([0.5, 0.5])  # r = 0, z = 0: 1 - s(0)
    out.losses.sum().backward()
    assert kl_policy.grad is None  # the reference point carries no gradient


def test_kto_refuses_one_mismatched_pair_and_bad_shapes():
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="1 mismatched pair\\(s\\): KTO's KL reference point needs at least 2"):
        kto_loss(one, one, torch.ones(1, dtype=torch.bool), one, one)
    two = torch.zeros(2)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        kto_loss(two, torch.zeros(3), torch.ones(2), two, two)
    with pytest.raises(ValueError, match="either kl_policy_logps and kl_ref_logps or reference_point"):
        kto_loss(two, two, torch.ones(2), two, two, reference_point=0.1)
    with pytest.raises(ValueError, match="reference_point=-0.5 must be one number >= 0"):
        kto_loss(two, two, torch.ones(2), reference_point=-0.5)


def test_kto_slices_with_the_global_reference_point_equal_the_whole_batch():
    """A step of 4 examples in micro-batches of 1 or 2 (or on 2 workers): z_ref is the clamp of
    the GLOBAL mean of kl_pi - kl_ref. Per-slice clamps would give z = 0 for [2, -3] and 0.5
    for [0.5, 0.5]; the global mean is 0, so z = 0 everywhere."""
    policy = torch.tensor([-4.0, -6.0, -5.0, -3.0])
    ref = torch.tensor([-5.0, -5.5, -5.0, -3.5])  # r = [1.0, -0.5, 0.0, 0.5]
    desirable = torch.tensor([True, False, True, False])
    kl_policy = torch.tensor([-5.0, -9.0, -7.5, -7.5])
    kl_ref = torch.tensor([-7.0, -6.0, -8.0, -8.0])  # kl_pi - kl_ref = [2, -3, 0.5, 0.5], mean 0
    z = kto_reference_point(kl_policy, kl_ref)
    assert z.item() == 0.0
    beta = 0.5
    r = [1.0, -0.5, 0.0, 0.5]
    want = [1 - sig(beta * r[i]) if desirable[i] else 1 - sig(-beta * r[i]) for i in range(4)]
    whole = kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta=beta).losses
    assert whole.tolist() == pytest.approx(want, abs=1e-6)
    for size in (1, 2):
        parts = [kto_loss(policy[i:i + size], ref[i:i + size], desirable[i:i + size], reference_point=z,
                          beta=beta).losses for i in range(0, 4, size)]
        assert torch.cat(parts).tolist() == pytest.approx(want, abs=1e-6)
    # what per-slice reference points would have given instead (the bug this guards against)
    halves = [kto_reference_point(kl_policy[i:i + 2], kl_ref[i:i + 2]).item() for i in (0, 2)]
    assert halves == [0.0, 0.5]
    z_mean = (0.5 + 0.3 - 0.1) / 3
    assert kto_reference_point(torch.tensor([-7.0, -6.0, -9.0]), torch.tensor([-7.5, -6.3, -8.9])).item() == \
        pytest.approx(z_mean, abs=1e-6)


# ---------------------------------------------------------------- DDPO

def test_weighted_sequence_logps_is_the_rlhfv_score():
    # unchanged tokens weight 1, changed tokens gamma = 5 (the paper's value)
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    weights = torch.tensor([[1.0, 5.0, 5.0, 1.0, 5.0]])
    # (1*-1 + 5*-2 + 5*-3 + 1*-4) / (1 + 5 + 5 + 1)
    assert weighted_sequence_logps(logps, mask, weights).item() == pytest.approx(-30 / 12)
    assert weighted_sequence_logps(logps, mask, weights, average=False).item() == pytest.approx(-30)
    assert weighted_sequence_logps(logps, mask, None).item() == pytest.approx(-2.5)
    empty = weighted_sequence_logps(logps, torch.zeros_like(mask), weights)
    assert empty.item() == 0.0


def test_weighted_scores_feed_any_dpo_loss():
    chosen = weighted_sequence_logps(torch.tensor([[-1.0, -2.0]]), torch.ones(1, 2), torch.tensor([[1.0, 5.0]]))
    rejected = weighted_sequence_logps(torch.tensor([[-3.0, -1.0]]), torch.ones(1, 2), None)
    out = dpo_loss(chosen, rejected, chosen.detach() + 0.1, rejected.detach(), beta=1.0)
    assert out.losses.item() == pytest.approx(-logsig(-0.1), abs=1e-6)


# ---------------------------------------------------------------- mDPO

def test_mdpo_hand_computed():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-5.0, -7.0, -6.0, -6.5))  # a = 1, b = -0.5
    p_corrupt, r_corrupt = torch.tensor([-9.0]), torch.tensor([-8.0])  # image log-ratio = -1
    beta = 0.5
    out = mdpo_loss(pc, pr, rc, rr, p_corrupt, r_corrupt, beta=beta, anchor=0.0)
    preference = -logsig(beta * 1.5)
    image = -logsig(beta * (1.0 - (-1.0)))
    anchor = -logsig(beta * 1.0)
    assert out.losses.item() == pytest.approx(preference + image + anchor, abs=1e-6)
    assert out.terms["image"].item() == pytest.approx(image, abs=1e-6)
    assert out.image_rewards.item() == pytest.approx(beta * -1.0)
    weighted = mdpo_loss(pc, pr, rc, rr, p_corrupt, r_corrupt, beta=beta, anchor=0.2, image_weight=0.5,
                         anchor_weight=2.0)
    assert weighted.losses.item() == pytest.approx(preference + 0.5 * image + 2.0 * -logsig(beta * 1.0 - 0.2),
                                                   abs=1e-6)


def test_mdpo_refuses_batch_level_loss_types():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="mDPO does not combine with the batch-level loss_type 'bco_pair'"):
        mdpo_loss(x, x, x, x, x, x, loss_type={"sigmoid": 1.0, "bco_pair": 0.2})


def test_mdpo_composes_with_other_loss_types():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-5.0, -7.0, -6.0, -6.5))
    pk, rk = torch.tensor([-9.0]), torch.tensor([-8.0])
    out = mdpo_loss(pc, pr, rc, rr, pk, rk, loss_type="ipo", beta=0.5, chosen_lengths=torch.tensor([2]),
                    rejected_lengths=torch.tensor([4]))
    # ipo on (chosen | real) vs (chosen | corrupted): both of length 2
    image = ((1.0 / 2 - (-1.0) / 2) - 1 / (2 * 0.5)) ** 2
    assert out.terms["image"].item() == pytest.approx(image, abs=1e-6)
    assert out.terms["ipo"].item() == pytest.approx((1.0 / 2 - (-0.5) / 4 - 1.0) ** 2, abs=1e-6)

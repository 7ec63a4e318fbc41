"""KTO, dense DPO (RLHF-V) and mDPO against hand-computed values and references."""

from __future__ import annotations

import difflib
import math
import random

import pytest
import torch

from vlrlhf.losses.ddpo import changed_token_mask, weighted_sequence_logps
from vlrlhf.losses.preference import dpo_loss, kto_loss, mdpo_loss


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


def test_kto_refuses_a_batch_of_one_and_bad_shapes():
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="batch size 1: KTO needs at least 2"):
        kto_loss(one, one, torch.ones(1, dtype=torch.bool), one, one)
    two = torch.zeros(2)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        kto_loss(two, torch.zeros(3), torch.ones(2), two, two)


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


def difflib_reference(chosen: list[int], rejected: list[int], min_match: int) -> list[bool]:
    """Brute force: chosen token i is unchanged iff some run of >= min_match tokens through
    it occurs in rejected. Checked by enumerating every window."""
    unchanged = [False] * len(chosen)
    for start in range(len(chosen)):
        for stop in range(start + min_match, len(chosen) + 1):
            window = chosen[start:stop]
            if any(rejected[j:j + len(window)] == window for j in range(len(rejected) - len(window) + 1)):
                for i in range(start, stop):
                    unchanged[i] = True
    return [not u for u in unchanged]


def test_changed_token_mask_on_a_correction():
    # "the cat sits on a red mat" corrected from "the dog sits on a red mat"
    chosen = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    rejected = torch.tensor([[10, 21, 12, 13, 14, 15, 16]])
    assert changed_token_mask(chosen, rejected).tolist() == [[True, True, False, False, False, False, False]]
    # "the" alone is a 1-token match, below min_match=3: counted as changed.
    assert changed_token_mask(chosen, rejected, min_match=1).tolist() == [[False, True] + [False] * 5]


def test_changed_token_mask_matches_brute_force_with_padding():
    rng = random.Random(0)
    chosen_rows, rejected_rows = [], []
    for _ in range(12):
        base = [rng.randrange(6) for _ in range(rng.randrange(3, 14))]
        edited = list(base)
        for _ in range(rng.randrange(0, 4)):
            position = rng.randrange(len(edited))
            edited[position] = rng.randrange(6, 9)
        chosen_rows.append(edited)
        rejected_rows.append(base[: rng.randrange(1, len(base) + 1)])
    width_c, width_r = max(map(len, chosen_rows)), max(map(len, rejected_rows))
    chosen = torch.tensor([row + [0] * (width_c - len(row)) for row in chosen_rows])
    rejected = torch.tensor([row + [0] * (width_r - len(row)) for row in rejected_rows])
    chosen_mask = torch.tensor([[1] * len(row) + [0] * (width_c - len(row)) for row in chosen_rows])
    rejected_mask = torch.tensor([[1] * len(row) + [0] * (width_r - len(row)) for row in rejected_rows])
    for min_match in (1, 2, 3):
        got = changed_token_mask(chosen, rejected, min_match, chosen_mask, rejected_mask)
        for i, (c, r) in enumerate(zip(chosen_rows, rejected_rows, strict=True)):
            assert got[i, : len(c)].tolist() == difflib_reference(c, r, min_match), (c, r, min_match)
            assert not got[i, len(c):].any()  # padding is never "changed"


def test_changed_tokens_agree_with_difflib_on_a_simple_edit():
    chosen, rejected = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 6, 7, 8]
    matcher = difflib.SequenceMatcher(a=chosen, b=rejected, autojunk=False)
    changed = [True] * len(chosen)
    for block in matcher.get_matching_blocks():
        if block.size >= 3:
            changed[block.a: block.a + block.size] = [False] * block.size
    assert changed_token_mask(torch.tensor([chosen]), torch.tensor([rejected]))[0].tolist() == changed


def test_changed_token_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must be \\(B, Tc\\) and \\(B, Tr\\)"):
        changed_token_mask(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="min_match=0"):
        changed_token_mask(torch.zeros(1, 3), torch.zeros(1, 3), min_match=0)


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


def test_mdpo_composes_with_other_loss_types():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-5.0, -7.0, -6.0, -6.5))
    pk, rk = torch.tensor([-9.0]), torch.tensor([-8.0])
    out = mdpo_loss(pc, pr, rc, rr, pk, rk, loss_type="ipo", beta=0.5, chosen_lengths=torch.tensor([2]),
                    rejected_lengths=torch.tensor([4]))
    # ipo on (chosen | real) vs (chosen | corrupted): both of length 2
    image = ((1.0 / 2 - (-1.0) / 2) - 1 / (2 * 0.5)) ** 2
    assert out.terms["image"].item() == pytest.approx(image, abs=1e-6)
    assert out.terms["ipo"].item() == pytest.approx((1.0 / 2 - (-0.5) / 4 - 1.0) ** 2, abs=1e-6)

"""DPO-family losses against values written out from each paper's formula.

The expected values below use only Python's math module on the concrete inputs,
never the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlrlhf.losses.preference import LOSS_TYPES, RunningMean, dpo_loss

# Two pairs. a = pi_c - ref_c, b = pi_r - ref_r, h = a - b.
PI_C, PI_R = [-5.0, -8.0], [-7.0, -6.0]
REF_C, REF_R = [-6.0, -7.5], [-6.5, -6.5]
LEN_C, LEN_R = [4, 5], [3, 2]
BETA = 0.5
A = [PI_C[i] - REF_C[i] for i in range(2)]  # [1.0, -0.5]
B = [PI_R[i] - REF_R[i] for i in range(2)]  # [-0.5, 0.5]
H = [A[i] - B[i] for i in range(2)]  # [1.5, -1.0]


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def run(loss_type, **options):
    tensors = [torch.tensor(v, dtype=torch.float64) for v in (PI_C, PI_R, REF_C, REF_R)]
    options.setdefault("chosen_lengths", torch.tensor(LEN_C))
    options.setdefault("rejected_lengths", torch.tensor(LEN_R))
    return dpo_loss(*tensors, loss_type=loss_type, beta=options.pop("beta", BETA), **options)


def expected(loss_type, eps=0.0, gamma=0.5, tau=0.05):
    out = []
    for i in range(2):
        a, b, h = A[i], B[i], H[i]
        a_n, b_n = a / LEN_C[i], b / LEN_R[i]
        avg_c, avg_r = PI_C[i] / LEN_C[i], PI_R[i] / LEN_R[i]
        x = BETA * h
        value = {
            "sigmoid": -(1 - eps) * logsig(x) - eps * logsig(-x),
            "robust": (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps),
            "hinge": max(0.0, 1 - x),
            "ipo": ((a_n - b_n) - 1 / (2 * BETA)) ** 2,
            "nca_pair": -logsig(BETA * a) - 0.5 * logsig(-BETA * a) - 0.5 * logsig(-BETA * b),
            "sppo_hard": (a - 1 / (2 * BETA)) ** 2 + (b + 1 / (2 * BETA)) ** 2,
            "apo_zero": 1 - sig(BETA * a) + sig(BETA * b),
            "apo_down": sig(BETA * a) + 1 - sig(BETA * h),
            "sigmoid_norm": -logsig(BETA * (a_n - b_n)),
            "simpo": (-(1 - eps) * logsig(BETA * (avg_c - avg_r) - gamma)
                      - eps * logsig(-(BETA * (avg_c - avg_r) - gamma))),
            "cpo": -logsig(BETA * (PI_C[i] - PI_R[i])),
            "sft": -avg_c,
        }.get(loss_type)
        if loss_type == "exo_pair":
            value = sig(x) * (logsig(x) - math.log(1 - eps)) + sig(-x) * (logsig(-x) - math.log(eps))
        if loss_type == "discopop":
            value = (1 - sig(x / tau)) * -logsig(x) + sig(x / tau) * math.exp(-x)
        if loss_type == "orpo":
            def log_odds(avg):
                return avg - math.log(1 - math.exp(avg))
            value = -BETA * logsig(log_odds(avg_c) - log_odds(avg_r))
        out.append(value)
    return out


SIMPLE = ["sigmoid", "hinge", "ipo", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm",
          "simpo", "cpo", "orpo", "sft", "discopop"]


@pytest.mark.parametrize("loss_type", SIMPLE)
def test_hand_computed_values(loss_type):
    got = run(loss_type).losses
    assert got.tolist() == pytest.approx(expected(loss_type), abs=1e-9)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.1), ("robust", 0.1), ("exo_pair", 1e-3), ("simpo", 0.2)])
def test_label_smoothing_variants(loss_type, eps):
    got = run(loss_type, label_smoothing=eps).losses
    assert got.tolist() == pytest.approx(expected(loss_type, eps=eps), abs=1e-9)


def test_sigmoid_numbers_written_out():
    # pair 0: beta*h = 0.75 -> -log s(0.75) = log(1 + e^-0.75) = 0.3868...; pair 1: beta*h = -0.5
    got = run("sigmoid").losses.tolist()
    assert got == pytest.approx([math.log(1 + math.exp(-0.75)), math.log(1 + math.exp(0.5))], abs=1e-12)
    assert got[0] == pytest.approx(0.386871, abs=1e-6)


def test_bco_pair_with_and_without_running_baseline():
    rewards = [BETA * v for v in A + B]  # beta*a then beta*b
    delta = sum(rewards) / 4
    want = [-logsig(BETA * A[i] - delta) - logsig(-(BETA * B[i] - delta)) for i in range(2)]
    assert run("bco_pair").losses.tolist() == pytest.approx(want, abs=1e-9)
    baseline = RunningMean()
    baseline.update(torch.tensor([1.0, 3.0]))  # earlier steps: mean 2 over 2 values
    delta = (1.0 + 3.0 + sum(rewards)) / 6
    want = [-logsig(BETA * A[i] - delta) - logsig(-(BETA * B[i] - delta)) for i in range(2)]
    assert run("bco_pair", baseline=baseline).losses.tolist() == pytest.approx(want, abs=1e-9)
    assert baseline.count == 6 and baseline.mean == pytest.approx(delta)


def test_aot_sorts_across_the_batch():
    # aot_pair: delta = sort(a) - sort(b) = [-0.5, 1.0] - [-0.5, 0.5] = [0.0, 0.5]
    assert run("aot_pair").losses.tolist() == pytest.approx([-logsig(0.0), -logsig(BETA * 0.5)], abs=1e-9)
    # aot: pi_c - pi_r = [2, -2] -> sorted [-2, 2]; ref_c - ref_r = [0.5, -1] -> sorted [-1, 0.5]
    assert run("aot").losses.tolist() == pytest.approx([-logsig(BETA * -1.0), -logsig(BETA * 1.5)], abs=1e-9)


def test_mixture_is_the_weighted_sum_of_terms():
    mix = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}  # MPO
    out = run(mix)
    parts = {name: run(name).losses for name in mix}
    torch.testing.assert_close(out.losses, sum(w * parts[n] for n, w in mix.items()))
    assert set(out.terms) == set(mix)
    as_list = run(["sigmoid", "sft"]).losses
    torch.testing.assert_close(as_list, parts["sigmoid"] + parts["sft"])


def test_rewards_are_beta_times_log_ratios():
    out = run("sigmoid")
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * v for v in A])
    assert out.rejected_rewards.tolist() == pytest.approx([BETA * v for v in B])
    assert not out.chosen_rewards.requires_grad


def test_sigmoid_is_log_2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -40.0, -0.5])
    out = dpo_loss(logps, logps - 1, logps, logps - 1, loss_type="sigmoid", beta=0.3)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)))


def test_reference_free_rewards():
    tensors = [torch.tensor(v) for v in (PI_C, PI_R)]
    lengths = dict(chosen_lengths=torch.tensor(LEN_C), rejected_lengths=torch.tensor(LEN_R))
    simpo = dpo_loss(*tensors, loss_type="simpo", beta=BETA, **lengths)
    assert simpo.chosen_rewards.tolist() == pytest.approx([BETA * PI_C[i] / LEN_C[i] for i in range(2)])
    cpo = dpo_loss(*tensors, loss_type="cpo", beta=BETA)
    assert cpo.rejected_rewards.tolist() == pytest.approx([BETA * v for v in PI_R])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "sigmoid_norm", "cpo", "simpo", "robust",
                                       "exo_pair"])
def test_swapping_chosen_and_rejected_mirrors_the_margin(loss_type):
    """These losses depend on the pair only through the margin m; swapping gives m -> -m.
    So loss(swapped) equals the loss at the negated margin, and rewards swap."""
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in (PI_C, PI_R, REF_C, REF_R))
    lc, lr = torch.tensor(LEN_C), torch.tensor(LEN_R)
    opts = dict(loss_type=loss_type, beta=BETA, label_smoothing=0.1 if loss_type in ("robust", "exo_pair") else 0)
    swapped = dpo_loss(pr, pc, rr, rc, chosen_lengths=lr, rejected_lengths=lc, **opts)
    original = dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **opts)
    torch.testing.assert_close(swapped.chosen_rewards, original.rejected_rewards)
    if loss_type in ("sigmoid", "cpo", "simpo") and opts["label_smoothing"] == 0:
        # -log s(m) - (-log s(-m)) = -m
        margin = {"sigmoid": BETA * torch.tensor(H, dtype=torch.float64),
                  "cpo": BETA * (pc - pr)}.get(loss_type)
        if margin is not None:
            torch.testing.assert_close(original.losses - swapped.losses, -margin)
    # Better margin, lower loss: the original pair 0 (h > 0) beats its swap.
    assert original.losses[0] < swapped.losses[0] or loss_type == "hinge" and original.losses[0] == 0


def test_bad_arguments_name_the_argument():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type 'dpoo' is not one of"):
        dpo_loss(x, x, x, x, loss_type="dpoo")
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(3,\)"):
        dpo_loss(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="label_smoothing=0.0 must lie in \\(0, 1\\) for loss_type 'exo_pair'"):
        dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="'ipo' needs chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="'sigmoid' needs ref_chosen_logps"):
        dpo_loss(x, x)
    with pytest.raises(ValueError, match="beta=0 must be positive"):
        dpo_loss(x, x, x, x, beta=0)
    with pytest.raises(ValueError, match="must be < 0.5 for loss_type 'robust'"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \(B,\)"):
        dpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))


def brute_force(loss_type, pc, pr, rc, rr, lc, lr, beta, eps=1e-3, gamma=0.5):
    """Scalar float64 reference for one pair (sorting types excluded)."""
    global PI_C, PI_R, REF_C, REF_R, LEN_C, LEN_R, A, B, H, BETA
    saved = (PI_C, PI_R, REF_C, REF_R, LEN_C, LEN_R, A, B, H, BETA)
    try:
        PI_C, PI_R, REF_C, REF_R, LEN_C, LEN_R = [pc] * 2, [pr] * 2, [rc] * 2, [rr] * 2, [lc] * 2, [lr] * 2
        A, B = [pc - rc] * 2, [pr - rr] * 2
        H, BETA = [A[0] - B[0]] * 2, beta
        return expected(loss_type, eps=eps if loss_type == "exo_pair" else 0.0, gamma=gamma)[0]
    finally:
        PI_C, PI_R, REF_C, REF_R, LEN_C, LEN_R, A, B, H, BETA = saved


@pytest.mark.parametrize("loss_type", SIMPLE + ["exo_pair"])
def test_agrees_with_float64_brute_force_on_random_inputs(loss_type):
    generator = torch.Generator().manual_seed(7)
    n = 16
    pc, pr = -torch.rand(n, generator=generator, dtype=torch.float64) * 30, -torch.rand(n, generator=generator,
                                                                                            dtype=torch.float64) * 30
    rc, rr = pc + torch.randn(n, generator=generator, dtype=torch.float64), pr + torch.randn(n, generator=generator,
                                                                                               dtype=torch.float64)
    lc, lr = torch.randint(1, 40, (n,), generator=generator), torch.randint(1, 40, (n,), generator=generator)
    out = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.2, chosen_lengths=lc, rejected_lengths=lr,
                   label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0).losses
    want = [brute_force(loss_type, pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), lc[i].item(),
                        lr[i].item(), 0.2) for i in range(n)]
    assert out.tolist() == pytest.approx(want, rel=1e-9, abs=1e-9)


# hinge has a kink; bco_pair's baseline is a detached statistic of the inputs by design.
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("hinge", "bco_pair")])
def test_gradcheck(loss_type):
    generator = torch.Generator().manual_seed(3)
    inputs = [(-torch.rand(4, generator=generator, dtype=torch.float64) * 5 - 0.1).requires_grad_()
              for _ in range(4)]
    lengths = dict(chosen_lengths=torch.tensor([2, 3, 4, 5]), rejected_lengths=torch.tensor([5, 4, 3, 2]))
    smoothing = 1e-2 if loss_type in ("exo_pair", "robust") else 0.0

    def f(pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.3, label_smoothing=smoothing,
                        **lengths).losses

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_no_nan_or_inf_at_extremes(loss_type, dtype):
    # log-probs down to -1e4, log-ratio gaps of +-1e3, a zero length
    pc = torch.tensor([-1e4, -1.0, -5.0, -1e-3], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1.0, -1e4, -5.0, -2.0], dtype=dtype, requires_grad=True)
    rc = torch.tensor([-1.0, -1e3 - 1.0, -1e3, -1e4], dtype=dtype)
    rr = torch.tensor([-1e4, -1.0, -5.0, -1e3], dtype=dtype)
    lengths = dict(chosen_lengths=torch.tensor([3, 1, 0, 7]), rejected_lengths=torch.tensor([1, 3, 2, 0]))
    out = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.5,
                   label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0, **lengths)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all()
    assert pr.grad is None if loss_type == "sft" else torch.isfinite(pr.grad).all()


def test_bradley_terry_written_out():
    from vlrlhf.losses.preference import bradley_terry_loss

    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 3.0])
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(2.0)), math.log(2.0)]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-6)
    margin = torch.tensor([0.5, 0.0, -1.0])  # Llama 2: the pair must win by the margin
    expected_margin = [math.log(1 + math.exp(-0.5)), expected[1], math.log(1 + math.exp(-1.0))]
    assert bradley_terry_loss(chosen, rejected, margin).tolist() == pytest.approx(expected_margin, abs=1e-6)
    centred = bradley_terry_loss(chosen, rejected, center_coef=0.1)
    assert (centred - bradley_terry_loss(chosen, rejected)).tolist() == pytest.approx([0.1, 0.4, 3.6], abs=1e-5)
    # only the difference matters without centring; the gradient is sigmoid(-d) for chosen
    scores = torch.tensor([0.3, -0.2], requires_grad=True)
    bradley_terry_loss(scores[:1], scores[1:]).sum().backward()
    assert scores.grad.tolist() == pytest.approx([-torch.sigmoid(torch.tensor(-0.5)).item(),
                                                  torch.sigmoid(torch.tensor(-0.5)).item()], abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(chosen, rejected[:2])

"""DPO-family losses against values written out from each paper's formula.

The expected values below use only Python's math module on the concrete inputs,
never the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlrlhf.losses.preference import LOSS_TYPES, SORTING, RunningMean, batch_statistics, dpo_loss

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
            "cpo": -(1 - eps) * logsig(BETA * (PI_C[i] - PI_R[i])) - eps * logsig(-BETA * (PI_C[i] - PI_R[i])),
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


# cpo: cDPO smoothing as in TRL's CPOTrainer (-(1-eps) log s(x) - eps log s(-x), x = beta (pi_c - pi_r)).
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.1), ("robust", 0.1), ("exo_pair", 1e-3), ("simpo", 0.2),
                                            ("cpo", 0.1)])
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
    tensors = [torch.tensor(v, dtype=torch.float64) for v in (PI_C, PI_R, REF_C, REF_R)]
    statistics = batch_statistics(*tensors, loss_type="bco_pair", beta=BETA, baseline=baseline)
    delta = (1.0 + 3.0 + sum(rewards)) / 6  # this batch is counted before it is used
    assert baseline.count == 6 and baseline.mean == pytest.approx(delta)
    want = [-logsig(BETA * A[i] - delta) - logsig(-(BETA * B[i] - delta)) for i in range(2)]
    assert run("bco_pair", statistics=statistics).losses.tolist() == pytest.approx(want, abs=1e-9)
    # evaluation: the baseline as it stands, not folded again
    frozen = batch_statistics(*tensors, loss_type="bco_pair", beta=BETA, baseline=baseline, fold=False)
    assert frozen.bco_delta.item() == pytest.approx(delta) and baseline.count == 6
    other = RunningMean()
    assert other.add(6.0, 3) == 2.0 and other.add(0.0, 1) == 1.5 and other.count == 4


def aot_reference(x, y, eps=0.0):
    """sum_k l(sort(x)_k - sort(y)_k), l the smoothed sigmoid at BETA: AOT's loss on a batch."""
    return sum(-(1 - eps) * logsig(BETA * (p - q)) - eps * logsig(-BETA * (p - q))
               for p, q in zip(sorted(x), sorted(y), strict=True))


def test_aot_sorts_across_the_batch():
    # aot_unpaired: sort(a) = [-0.5, 1.0], sort(b) = [-0.5, 0.5] -> delta [0.0, 0.5]. Pair 0's a = 1.0
    # has rank 1, so pair 0 carries position 1's term and pair 1 position 0's.
    out = run("aot_unpaired").losses.tolist()
    assert out == pytest.approx([-logsig(BETA * 0.5), -logsig(0.0)], abs=1e-9)
    # aot: pi_c - pi_r = [2, -2] -> sorted [-2, 2]; ref_c - ref_r = [0.5, -1] -> sorted [-1, 0.5];
    # pair 0's margin 2 has rank 1: delta 2 - 0.5; pair 1's -2 has rank 0: delta -2 - (-1)
    assert run("aot").losses.tolist() == pytest.approx([-logsig(BETA * 1.5), -logsig(BETA * -1.0)], abs=1e-9)
    with_eps = run("aot", label_smoothing=0.1).losses.sum().item()
    assert with_eps == pytest.approx(aot_reference([2.0, -2.0], [0.5, -1.0], eps=0.1), abs=1e-9)


def test_aot_pair_is_a_deprecated_alias_of_aot_unpaired():
    with pytest.warns(FutureWarning, match="'aot_pair' is deprecated.*'aot_unpaired'"):
        old = run("aot_pair")
    torch.testing.assert_close(old.losses, run("aot_unpaired").losses)
    assert set(old.terms) == {"aot_unpaired"}
    with pytest.warns(FutureWarning):
        mixed = run({"aot_pair": 0.5, "sigmoid": 1.0}).losses
    torch.testing.assert_close(mixed, run({"aot_unpaired": 0.5, "sigmoid": 1.0}).losses)


def random_batch(n, seed):
    generator = torch.Generator().manual_seed(seed)
    pc, pr = (-torch.rand(n, generator=generator, dtype=torch.float64) * 20 for _ in range(2))
    rc, rr = (v + torch.randn(n, generator=generator, dtype=torch.float64) for v in (pc, pr))
    return pc, pr, rc, rr


@pytest.mark.parametrize("loss_type", ["bco_pair", "aot", "aot_unpaired",
                                       {"sigmoid": 0.8, "bco_pair": 0.2, "aot": 0.5}])
@pytest.mark.parametrize("sizes", [[8], [4, 4], [1] * 8, [3, 1, 4]])
def test_batch_level_types_scored_in_slices_equal_the_whole_batch(loss_type, sizes):
    """The step's batch split into micro-batches: with the whole batch's statistics, the
    slices' summed losses and gradients equal the whole batch's, which equal the formula
    written out with Python's sorted() and mean."""
    pc, pr, rc, rr = random_batch(8, seed=11)
    weights = loss_type if isinstance(loss_type, dict) else {loss_type: 1.0}
    a, b = (pc - rc).tolist(), (pr - rr).tolist()
    rewards = [BETA * v for v in a + b]
    delta = sum(rewards) / len(rewards)
    want = 0.0
    for name, weight in weights.items():
        if name == "bco_pair":
            want += weight * sum(-logsig(BETA * a[i] - delta) - logsig(-(BETA * b[i] - delta)) for i in range(8))
        elif name == "aot":
            want += weight * aot_reference((pc - pr).tolist(), (rc - rr).tolist())
        elif name == "aot_unpaired":
            want += weight * aot_reference(a, b)
        else:
            want += weight * sum(-logsig(BETA * (a[i] - b[i])) for i in range(8))

    def total(split):
        policy = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
        statistics = batch_statistics(*policy, rc, rr, loss_type=loss_type, beta=BETA)
        value, start = 0.0, 0
        for size in split:
            part = slice(start, start + size)
            out = dpo_loss(policy[0][part], policy[1][part], rc[part], rr[part], loss_type=loss_type, beta=BETA,
                           statistics=statistics.select(start, start + size))
            out.losses.sum().backward()
            value += out.losses.sum().item()
            start += size
        return value, policy[0].grad, policy[1].grad

    whole = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=BETA).losses.sum().item()
    assert whole == pytest.approx(want, abs=1e-9)
    value, grad_c, grad_r = total(sizes)
    assert value == pytest.approx(want, abs=1e-9)
    _, whole_c, whole_r = total([8])
    torch.testing.assert_close(grad_c, whole_c, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_r, whole_r, atol=1e-12, rtol=0)


@pytest.mark.parametrize("loss_type", SORTING)
def test_aot_gradient_is_the_gradient_of_the_sorted_sum(loss_type):
    """d/dx_j sum_k l(sort(x)_k - sort(y)_k), by central differences on the written-out sum
    (no ties, so sorting is locally constant)."""
    pc, pr, rc, rr = random_batch(6, seed=5)
    inputs = [v.clone().requires_grad_() for v in (pc, pr, rc, rr)]
    dpo_loss(*inputs, loss_type=loss_type, beta=BETA).losses.sum().backward()

    def reference(values):
        pc_, pr_, rc_, rr_ = values
        pairs = ((pc_, pr_), (rc_, rr_)) if loss_type == "aot" else ((pc_, rc_), (pr_, rr_))
        return aot_reference(*([p - q for p, q in zip(*two, strict=True)] for two in pairs))

    base = [v.tolist() for v in (pc, pr, rc, rr)]
    for which in range(4):
        for j in range(6):
            up = [list(v) for v in base]
            down = [list(v) for v in base]
            up[which][j] += 1e-6
            down[which][j] -= 1e-6
            numeric = (reference(up) - reference(down)) / 2e-6
            assert inputs[which].grad[j].item() == pytest.approx(numeric, abs=1e-6), (which, j)


def test_options_the_loss_types_do_not_use_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing=0.1 is not used by loss_type hinge, ipo"):
        dpo_loss(x, x, x, x, loss_type=["hinge", "ipo"], label_smoothing=0.1, chosen_lengths=x, rejected_lengths=x)
    with pytest.raises(ValueError, match="gamma=1.0 .* not used by loss_type sigmoid; it applies to simpo"):
        dpo_loss(x, x, x, x, gamma=1.0)
    with pytest.raises(ValueError, match="discopop_tau=0.1 is not used by loss_type sigmoid"):
        dpo_loss(x, x, x, x, discopop_tau=0.1)
    # a mixture takes an option when one of its types uses it (smoothing applies to that type only)
    mixed = dpo_loss(x, x, x, x, loss_type={"sigmoid": 1.0, "hinge": 1.0}, label_smoothing=0.1)
    assert mixed.terms["hinge"].tolist() == [1.0, 1.0]
    simpo = dpo_loss(x, x, loss_type="simpo", gamma=1.0, chosen_lengths=x + 1, rejected_lengths=x + 1)
    assert simpo.losses.tolist() == pytest.approx([-logsig(-1.0)] * 2)


def test_statistics_of_another_batch_size_are_refused():
    pc, pr, rc, rr = random_batch(4, seed=1)
    statistics = batch_statistics(pc, pr, rc, rr, loss_type="aot", beta=BETA)
    with pytest.raises(ValueError, match="no share for loss_type 'aot' of this batch's size 2"):
        dpo_loss(pc[:2], pr[:2], rc[:2], rr[:2], loss_type="aot", statistics=statistics)
    with pytest.raises(ValueError, match="no share for loss_type 'bco_pair'"):
        dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", statistics=statistics)


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


# hinge has a kink; bco_pair's baseline is a detached statistic of the inputs by design; the sorting
# types split their sum over pairs by rank (their gradient: test_aot_gradient_is_the_gradient_of_the_sorted_sum).
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("hinge", "bco_pair") + SORTING])
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

"""Pairwise preference objectives: the DPO family and reference-free variants.

Notation (all tensors (B,), one entry per preference pair, fp32 inside):
  pi_c, pi_r    policy log-probs of chosen / rejected, SUMMED over answer tokens
  ref_c, ref_r  the same under the reference model
  len_c, len_r  answer lengths in tokens (length-normalised types)
  a = pi_c - ref_c,  b = pi_r - ref_r,  h = a - b     (log-ratios and their margin)
  a', b', h'    the same with log-ratios divided by lengths (a' = a / len_c, ...)
  avg_c = pi_c / len_c, avg_r = pi_r / len_r           (mean token log-probs)
  eps = label_smoothing

Every loss is per pair (B,); the caller averages. Types, formulas and papers:

  sigmoid       -(1-eps) log s(beta h) - eps log s(-beta h)          DPO (Rafailov+ 2023); eps > 0 is cDPO
  robust        [-(1-eps) log s(beta h) + eps log s(-beta h)] / (1-2 eps)   Chowdhury+ 2024, eps < 1/2
  hinge         relu(1 - beta h)                                      SLiC-HF (Zhao+ 2023)
  ipo           (h' - 1/(2 beta))^2, log-ratios averaged over tokens  IPO (Azar+ 2023), as its authors use it
  exo_pair      s(beta h)[log s(beta h) - log(1-eps)] + s(-beta h)[log s(-beta h) - log eps]
                                                                      EXO (Ji+ 2024), eps in (0, 1)
  nca_pair      -log s(beta a) - 1/2 log s(-beta a) - 1/2 log s(-beta b)   NCA (Chen+ 2024)
  bco_pair      -log s(beta a - delta) - log s(-(beta b - delta)), delta = mean of the rewards
                beta a, beta b over every batch so far, this one included (a RunningMean given to
                batch_statistics), or over this batch alone               BCO (Jung+ 2024)
  sppo_hard     (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2               SPPO with hard labels (Wu+ 2024)
  aot           smoothed sigmoid loss on delta = sort(pi_c - pi_r) - sort(ref_c - ref_r), sorted over
                the batch: the policy's margin distribution dominates the reference's   AOT (Melnyk+ 2024), paired
  aot_unpaired  smoothed sigmoid loss on delta = sort(a) - sort(b): the chosen log-ratios' distribution
                dominates the rejected ones'                       AOT, unpaired form (`aot_pair`: old name)
  apo_zero      1 - s(beta a) + s(beta b)                             APO-zero (D'Oosterlinck+ 2024)
  apo_down      s(beta a) + 1 - s(beta h)                             APO-down
  discopop      (1 - s(rho/tau)) (-log s(rho)) + s(rho/tau) exp(-rho), rho = beta h   LRML (Lu+ 2024)
  sigmoid_norm  -log s(beta h')                                       length-normalised DPO
  simpo         -(1-eps) log s(x) - eps log s(-x), x = beta (avg_c - avg_r) - gamma   SimPO (Meng+ 2024)
  cpo           -(1-eps) log s(x) - eps log s(-x), x = beta (pi_c - pi_r)   CPO (Xu+ 2024); add `sft` for
                its NLL term; eps > 0 is the cDPO smoothing of TRL's CPOTrainer
  orpo          -beta log s(log odds_c - log odds_r), log odds = avg - log(1 - exp(avg));
                beta is the paper's lambda                            ORPO (Hong+ 2024); add `sft`
  sft           -avg_c: NLL of the chosen answer per token            RPO (Pang+ 2024) as a mixed term

Options a type does not use are refused, not ignored: label_smoothing > 0 needs one of
USES_LABEL_SMOOTHING, a gamma other than 0.5 needs simpo, a discopop_tau other than 0.05
needs discopop (check_loss_options; the job spec runs the same check).

Batch-level types (bco_pair, aot, aot_unpaired) depend on the whole batch: delta is a mean
over it, or pairs are matched by rank in it. When a batch is scored a slice at a time
(micro-batches, data-parallel workers), `batch_statistics` on the whole batch and
`BatchStatistics.select` per slice make the slices' summed losses and gradients equal
those of the whole batch. For the sorting types the per-pair split is bookkeeping: pair j
carries the sorted position of its own rank, and only the sum is the AOT loss.

Mixing: `loss_type` may be a mapping {type: weight} (or a list, all weights 1), e.g.
MPO = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}; the loss is the weighted sum.
Rewards: beta * a and beta * b when reference log-probs are given; for reference-free
runs, beta * avg (simpo, orpo) or beta * pi (cpo). Lengths of 0 count as 1.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from vlrlhf.losses.aggregation import upcast

REFERENCE_FREE = ("simpo", "cpo", "orpo", "sft")
NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "simpo", "orpo", "sft")
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm") + REFERENCE_FREE
DEPRECATED = {"aot_pair": "aot_unpaired"}  # old name -> type; accepted with a FutureWarning
USES_LABEL_SMOOTHING = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo")
SORTING = ("aot", "aot_unpaired")  # pairs matched by rank across the batch
BATCH_LEVEL = ("bco_pair",) + SORTING  # the loss of a pair depends on the rest of the batch
DEFAULT_GAMMA = 0.5
DEFAULT_DISCOPOP_TAU = 0.05


@dataclasses.dataclass
class PreferenceOutput:
    losses: torch.Tensor  # (B,) weighted sum of the terms, per pair
    chosen_rewards: torch.Tensor  # (B,) implicit reward of the chosen answer (detached)
    rejected_rewards: torch.Tensor  # (B,) implicit reward of the rejected answer (detached)
    terms: dict[str, torch.Tensor]  # (B,) each unweighted term, by loss type


class RunningMean:
    """Running mean of rewards across steps: BCO's baseline delta (detached).

    `update(values)` folds a batch in and returns the new mean (the batch is counted
    before it is used, as in the BCO paper's algorithm); `add(total, count)` does the
    same from a batch's sum and size.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0

    def update(self, values: torch.Tensor) -> float:
        values = values.detach().double()
        return self.add(values.sum().item(), values.numel())

    def add(self, total: float, count: int) -> float:
        if count:
            self.count += count
            self.mean += (total - count * self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean = int(state["count"]), float(state["mean"])


def normalise_loss_types(loss_type: str | Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    if isinstance(loss_type, str):
        weights = {loss_type: 1.0}
    elif isinstance(loss_type, Mapping):
        weights = {str(k): float(v) for k, v in loss_type.items()}
    else:
        weights = {str(k): 1.0 for k in loss_type}
    if not weights:
        raise ValueError("loss_type is empty; give at least one of " + ", ".join(LOSS_TYPES))
    for old, new in DEPRECATED.items():
        if old in weights:
            warnings.warn(f"loss_type {old!r} is deprecated; it is AOT's unpaired form, now named {new!r}",
                          FutureWarning, stacklevel=3)
            weights = {new if name == old else name: weight for name, weight in weights.items()}
    unknown = [name for name in weights if name not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_type {unknown[0]!r} is not one of {', '.join(LOSS_TYPES)}")
    return weights


def check_loss_options(weights: Mapping[str, float], *, label_smoothing: float = 0.0,
                       gamma: float = DEFAULT_GAMMA, discopop_tau: float = DEFAULT_DISCOPOP_TAU) -> None:
    """Refuse an option that none of the chosen types uses, or a value a type cannot take.
    `weights`: normalise_loss_types' output. Messages name the option and the types."""
    types = ", ".join(weights)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
    if label_smoothing > 0 and not any(t in USES_LABEL_SMOOTHING for t in weights):
        raise ValueError(f"label_smoothing={label_smoothing} is not used by loss_type {types}; it applies to "
                         f"{', '.join(USES_LABEL_SMOOTHING)}")
    if "robust" in weights and label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be < 0.5 for loss_type 'robust'")
    if "exo_pair" in weights and not 0 < label_smoothing < 1:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in (0, 1) for loss_type 'exo_pair' "
                         "(it is EXO's epsilon; 1e-3 is usual)")
    if gamma != DEFAULT_GAMMA and "simpo" not in weights:
        raise ValueError(f"gamma={gamma} (SimPO's target margin) is not used by loss_type {types}; "
                         "it applies to simpo")
    if discopop_tau != DEFAULT_DISCOPOP_TAU and "discopop" not in weights:
        raise ValueError(f"discopop_tau={discopop_tau} is not used by loss_type {types}; it applies to discopop")
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau={discopop_tau} must be positive")


# ---------------------------------------------------------------- whole-batch statistics

@dataclasses.dataclass
class BatchStatistics:
    """What the batch-level types need from the WHOLE batch, detached, one entry per pair
    of that batch (N,). `select(start, stop)` gives a slice's share; dpo_loss on each slice
    with its share then sums to dpo_loss on the whole batch (values and gradients).

    partners[type] = (x_partner, y_partner) for a sorting type whose delta is
    sort(x) - sort(y) (aot: x = pi_c - pi_r, y = ref_c - ref_r; aot_unpaired: x = a, y = b):
    x_partner[j] = sort(y)[rank of x_j], y_partner[j] = sort(x)[rank of y_j].
    """

    bco_delta: torch.Tensor | None = None  # () BCO's delta
    partners: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def select(self, start: int, stop: int) -> BatchStatistics:
        return BatchStatistics(self.bco_delta, {name: (x[start:stop], y[start:stop])
                                                for name, (x, y) in self.partners.items()})


def _sorted_partners(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def ranks(values: torch.Tensor) -> torch.Tensor:
        order = torch.sort(values, stable=True).indices
        return torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))

    x, y = x.detach(), y.detach()
    return torch.sort(y).values[ranks(x)], torch.sort(x).values[ranks(y)]


def batch_statistics(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                     ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *,
                     loss_type: str | Sequence[str] | Mapping[str, float] = "sigmoid", beta: float = 0.1,
                     baseline: RunningMean | None = None, fold: bool = True) -> BatchStatistics:
    """BatchStatistics of a whole batch ((N,) log-probs, as dpo_loss takes them).

    bco_pair: the rewards beta a, beta b of this batch are folded into `baseline` (a
    RunningMean kept across steps: BCO counts a batch before using it) and delta is its
    new mean; `fold=False` (evaluation) uses the baseline's mean as it stands. Without a
    baseline, delta is this batch's mean reward.
    """
    weights = normalise_loss_types(loss_type)
    if not any(t in BATCH_LEVEL for t in weights):
        return BatchStatistics()
    if ref_chosen_logps is None or ref_rejected_logps is None:
        first = next(t for t in weights if t in BATCH_LEVEL)
        raise ValueError(f"loss_type {first!r} needs ref_chosen_logps and ref_rejected_logps")
    pi_c, pi_r = upcast(policy_chosen_logps).detach(), upcast(policy_rejected_logps).detach()
    ref_c, ref_r = upcast(ref_chosen_logps).detach(), upcast(ref_rejected_logps).detach()
    a, b = pi_c - ref_c, pi_r - ref_r
    statistics = BatchStatistics()
    if "bco_pair" in weights:
        rewards = torch.cat([beta * a, beta * b])
        if baseline is None:
            delta = rewards.mean().item()
        else:
            delta = baseline.update(rewards) if fold else baseline.mean
        statistics.bco_delta = torch.tensor(delta, dtype=a.dtype, device=a.device)
    if "aot" in weights:
        statistics.partners["aot"] = _sorted_partners(pi_c - pi_r, ref_c - ref_r)
    if "aot_unpaired" in weights:
        statistics.partners["aot_unpaired"] = _sorted_partners(a, b)
    return statistics


def _sorted_pairing_loss(x: torch.Tensor, y: torch.Tensor, partners: tuple[torch.Tensor, torch.Tensor],
                         beta: float, eps: float) -> torch.Tensor:
    """Per pair j: l(x_j - x_partner_j), l the smoothed sigmoid at beta. Over the batch these
    are the terms l(sort(x)_k - sort(y)_k), one per sorted position k. y_j's gradient comes
    from the term at y_j's own rank, which another pair holds: it is added here as a term
    of value 0 with that gradient."""
    x_partner, y_partner = (p.to(x.device, x.dtype) for p in partners)
    own = _smoothed_sigmoid(beta * (x - x_partner), eps)
    carried = _smoothed_sigmoid(beta * (y_partner - y), eps)
    return own + carried - carried.detach()


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_inputs(named: dict[str, torch.Tensor | None]) -> int:
    present = {k: v for k, v in named.items() if v is not None}
    shapes = {k: tuple(v.shape) for k, v in present.items()}
    first_name, first_shape = next(iter(shapes.items()))
    if len(first_shape) != 1:
        raise ValueError(f"{first_name} must have shape (B,), got {first_shape}")
    for name, shape in shapes.items():
        if shape != first_shape:
            raise ValueError(f"{name} has shape {shape} but {first_name} has {first_shape}")
    return first_shape[0]


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
             loss_type: str | Sequence[str] | Mapping[str, float] = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, gamma: float = DEFAULT_GAMMA,
             discopop_tau: float = DEFAULT_DISCOPOP_TAU, statistics: BatchStatistics | None = None) -> PreferenceOutput:
    """Preference loss per pair; see the module docstring for every type's formula.

    Inputs are (B,) summed log-probs; lengths (B,) token counts. `gamma` is SimPO's
    target margin, `discopop_tau` the LRML temperature. `statistics`: the batch-level
    types' share of the whole batch this one is a slice of (BatchStatistics.select);
    None: this batch is the whole batch.
    """
    weights = normalise_loss_types(loss_type)
    _check_inputs({"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                   "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
                   "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths})
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    check_loss_options(weights, label_smoothing=label_smoothing, gamma=gamma, discopop_tau=discopop_tau)
    needs_reference = [t for t in weights if t not in REFERENCE_FREE]
    if needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {needs_reference[0]!r} needs ref_chosen_logps and ref_rejected_logps")
    needs_lengths = [t for t in weights if t in NEEDS_LENGTHS]
    if needs_lengths and (chosen_lengths is None or (rejected_lengths is None and needs_lengths != ["sft"])):
        raise ValueError(f"loss_type {needs_lengths[0]!r} needs chosen_lengths and rejected_lengths")

    pi_c, pi_r = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    has_ref = ref_chosen_logps is not None and ref_rejected_logps is not None
    ref_c = upcast(ref_chosen_logps) if has_ref else torch.zeros_like(pi_c)
    ref_r = upcast(ref_rejected_logps) if has_ref else torch.zeros_like(pi_r)
    len_c = chosen_lengths.float().clamp(min=1) if chosen_lengths is not None else None
    len_r = rejected_lengths.float().clamp(min=1) if rejected_lengths is not None else None
    a, b = pi_c - ref_c, pi_r - ref_r
    h = a - b
    eps = label_smoothing

    def length_normalised_margin() -> torch.Tensor:
        return a / len_c - b / len_r

    if statistics is None:
        statistics = batch_statistics(pi_c, pi_r, ref_c if has_ref else None, ref_r if has_ref else None,
                                      loss_type=weights, beta=beta)
    for name in (t for t in weights if t in BATCH_LEVEL):
        share = statistics.bco_delta if name == "bco_pair" else statistics.partners.get(name, (None,))[0]
        if share is None or (name in SORTING and len(share) != len(pi_c)):
            raise ValueError(f"statistics: no share for loss_type {name!r} of this batch's size {len(pi_c)} "
                             "(batch_statistics on the whole batch, then select this slice)")

    terms: dict[str, torch.Tensor] = {}
    for name in weights:
        if name == "sigmoid":
            term = _smoothed_sigmoid(beta * h, eps)
        elif name == "robust":
            term = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        elif name == "hinge":
            term = F.relu(1 - beta * h)
        elif name == "ipo":
            term = (length_normalised_margin() - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            x = beta * h
            term = (torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1 - eps))
                    + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
        elif name == "nca_pair":
            term = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
        elif name == "bco_pair":
            delta = statistics.bco_delta.to(a.device, a.dtype)
            term = -F.logsigmoid(beta * a - delta) - F.logsigmoid(-(beta * b - delta))
        elif name == "sppo_hard":
            term = (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
        elif name == "aot":
            term = _sorted_pairing_loss(pi_c - pi_r, ref_c - ref_r, statistics.partners["aot"], beta, eps)
        elif name == "aot_unpaired":
            term = _sorted_pairing_loss(a, b, statistics.partners["aot_unpaired"], beta, eps)
        elif name == "apo_zero":
            term = 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
        elif name == "apo_down":
            term = torch.sigmoid(beta * a) + 1 - torch.sigmoid(beta * h)
        elif name == "discopop":
            rho = beta * h
            # s(rho/tau) * exp(-rho) as one exp, finite for very negative rho.
            term = (1 - torch.sigmoid(rho / discopop_tau)) * -F.logsigmoid(rho) + torch.exp(
                F.logsigmoid(rho / discopop_tau) - rho)
        elif name == "sigmoid_norm":
            term = -F.logsigmoid(beta * length_normalised_margin())
        elif name == "simpo":
            term = _smoothed_sigmoid(beta * (pi_c / len_c - pi_r / len_r) - gamma, eps)
        elif name == "cpo":
            term = _smoothed_sigmoid(beta * (pi_c - pi_r), eps)
        elif name == "orpo":
            avg_c, avg_r = pi_c / len_c, pi_r / len_r
            log_odds = (avg_c - _log1mexp(avg_c)) - (avg_r - _log1mexp(avg_r))
            term = -beta * F.logsigmoid(log_odds)
        else:  # sft
            term = -pi_c / len_c
        terms[name] = term

    losses = sum(weights[name] * term for name, term in terms.items())
    if has_ref:
        chosen_rewards, rejected_rewards = beta * a, beta * b
    elif any(t in weights for t in ("simpo", "orpo")):
        chosen_rewards, rejected_rewards = beta * pi_c / len_c, beta * pi_r / len_r
    else:
        chosen_rewards, rejected_rewards = beta * pi_c, beta * pi_r
    return PreferenceOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), terms)


# ---------------------------------------------------------------- mDPO

@dataclasses.dataclass
class MDPOOutput(PreferenceOutput):
    image_rewards: torch.Tensor = None  # (B,) beta * log-ratio of the chosen answer on the corrupted image


def mdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
              policy_corrupted_logps: torch.Tensor, ref_corrupted_logps: torch.Tensor, *,
              loss_type: str | Sequence[str] | Mapping[str, float] = "sigmoid", beta: float = 0.1,
              anchor: float = 0.0, image_weight: float = 1.0, anchor_weight: float = 1.0,
              **options) -> MDPOOutput:
    """mDPO (Wang+ 2024, arXiv 2406.11839): L = L_pref + w_img L_image + w_anc L_anchor.

    L_pref   the chosen `loss_type` on (chosen, rejected) with the real image
    L_image  the same loss type on (chosen answer | real image) vs (chosen answer |
             corrupted image): the image, not the text, must carry the preference
    L_anchor -log s(beta (pi_c - ref_c) - anchor): keeps the chosen reward above `anchor`

    *_corrupted_logps: (B,) summed log-probs of the CHOSEN answer given the corrupted
    image. `options` go to dpo_loss (label_smoothing, lengths, ...); for length-
    normalised types the corrupted answer has the chosen answer's length. Batch-level
    types (bco_pair, aot, aot_unpaired) are refused: the image term would need statistics
    of its own.
    """
    batch_level = [t for t in normalise_loss_types(loss_type) if t in BATCH_LEVEL]
    if batch_level:
        raise ValueError(f"mDPO does not combine with the batch-level loss_type {batch_level[0]!r}")
    preference = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          loss_type=loss_type, beta=beta, **options)
    image_options = dict(options)
    if options.get("chosen_lengths") is not None:
        image_options["rejected_lengths"] = options["chosen_lengths"]
    image = dpo_loss(policy_chosen_logps, policy_corrupted_logps, ref_chosen_logps, ref_corrupted_logps,
                     loss_type=loss_type, beta=beta, **image_options)
    anchor_term = -F.logsigmoid(beta * (upcast(policy_chosen_logps) - upcast(ref_chosen_logps)) - anchor)
    losses = preference.losses + image_weight * image.losses + anchor_weight * anchor_term
    terms = {**preference.terms, "image": image.losses, "anchor": anchor_term}
    return MDPOOutput(losses, preference.chosen_rewards, preference.rejected_rewards, terms,
                      image_rewards=image.rejected_rewards)


# ---------------------------------------------------------------- KTO

@dataclasses.dataclass
class KTOOutput:
    losses: torch.Tensor  # (B,) per example
    rewards: torch.Tensor  # (B,) beta * (pi - ref), detached
    kl: torch.Tensor  # () the reference point z_ref, detached


def kto_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_ref = max(0, mean(kl_pi - kl_ref)), () detached.

    kl_*: (N,) summed log-probs of the MISMATCHED pairs (prompt i with the completion of
    another example) of the WHOLE batch, an estimate of KL(pi || ref). When a step's batch
    is split over micro-batches and data-parallel workers, gather every slice's values
    first: the clamp applies to the global mean (a mean of clamped slice means is larger,
    and changes with the split). At least 2 pairs; the estimate is noisy below ~8 (the
    paper uses >= 32).
    """
    count = _check_inputs({"kl_policy_logps": kl_policy_logps, "kl_ref_logps": kl_ref_logps})
    if count < 2:
        raise ValueError(f"kl_policy_logps has {count} mismatched pair(s): KTO's KL reference point needs at "
                         "least 2")
    return (upcast(kl_policy_logps) - upcast(kl_ref_logps)).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, is_desirable: torch.Tensor,
             kl_policy_logps: torch.Tensor | None = None, kl_ref_logps: torch.Tensor | None = None, *,
             reference_point: torch.Tensor | float | None = None, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOOutput:
    """KTO (Ethayarajh+ 2024), unpaired. (B,) per example:

    r = pi - ref (summed log-probs), z_ref the reference point (kto_reference_point):
      desirable:    w_d (1 - s(beta (r - z_ref)))
      undesirable:  w_u (1 - s(beta (z_ref - r)))
    Give either this batch's mismatched-pair log-probs kl_* (z_ref is computed from them:
    the batch is the whole batch) or `reference_point`, z_ref of the whole batch this one
    is a slice of (then any slice size works, 1 included).
    """
    batch = _check_inputs({"policy_logps": policy_logps, "ref_logps": ref_logps, "is_desirable": is_desirable})
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    if (reference_point is None) == (kl_policy_logps is None or kl_ref_logps is None):
        raise ValueError("kto_loss takes either kl_policy_logps and kl_ref_logps or reference_point")
    if reference_point is None:
        z_ref = kto_reference_point(kl_policy_logps, kl_ref_logps)
    else:
        z_ref = reference_point.detach() if isinstance(reference_point, torch.Tensor) \
            else torch.tensor(float(reference_point), dtype=torch.float64)
        if z_ref.ndim != 0 or z_ref < 0:
            raise ValueError(f"reference_point={reference_point} must be one number >= 0 (KTO clamps it at 0)")
    if batch < 1:
        raise ValueError("policy_logps is empty")
    r = upcast(policy_logps) - upcast(ref_logps)
    z_ref = z_ref.to(r.device, r.dtype)
    desirable = is_desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z_ref))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - r))))
    return KTOOutput(losses, (beta * r).detach(), z_ref)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Reward-model loss (Bradley & Terry 1952; Ouyang+ 2022), (B,) per pair:

        -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2

    m: an optional (B,) preference margin (Llama 2); the centring term (Eisenstein+ 2023)
    keeps scores near zero, since the loss only sees their differences.
    """
    _check_inputs({"chosen_scores": chosen_scores, "rejected_scores": rejected_scores, "margin": margin})
    difference = upcast(chosen_scores) - upcast(rejected_scores)
    if margin is not None:
        difference = difference - upcast(margin)
    losses = -F.logsigmoid(difference)
    if center_coef:
        losses = losses + center_coef * (upcast(chosen_scores) + upcast(rejected_scores)) ** 2
    return losses

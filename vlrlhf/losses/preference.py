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
  bco_pair      -log s(beta a - delta) - log s(-(beta b - delta)), delta = running mean of the
                rewards beta a, beta b (a RunningMean; this batch's mean if none)   BCO (Jung+ 2024)
  sppo_hard     (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2               SPPO with hard labels (Wu+ 2024)
  aot           sigmoid loss on delta = sort(pi_c - pi_r) - sort(ref_c - ref_r)   AOT (Melnyk+ 2024)
  aot_pair      sigmoid loss on delta = sort(a) - sort(b)                         AOT, paired
  apo_zero      1 - s(beta a) + s(beta b)                             APO-zero (D'Oosterlinck+ 2024)
  apo_down      s(beta a) + 1 - s(beta h)                             APO-down
  discopop      (1 - s(rho/tau)) (-log s(rho)) + s(rho/tau) exp(-rho), rho = beta h   LRML (Lu+ 2024)
  sigmoid_norm  -log s(beta h')                                       length-normalised DPO
  simpo         -(1-eps) log s(x) - eps log s(-x), x = beta (avg_c - avg_r) - gamma   SimPO (Meng+ 2024)
  cpo           -log s(beta (pi_c - pi_r))                            CPO (Xu+ 2024); add `sft` for its NLL term
  orpo          -beta log s(log odds_c - log odds_r), log odds = avg - log(1 - exp(avg));
                beta is the paper's lambda                            ORPO (Hong+ 2024); add `sft`
  sft           -avg_c: NLL of the chosen answer per token            RPO (Pang+ 2024) as a mixed term

Mixing: `loss_type` may be a mapping {type: weight} (or a list, all weights 1), e.g.
MPO = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}; the loss is the weighted sum.
Rewards: beta * a and beta * b when reference log-probs are given; for reference-free
runs, beta * avg (simpo, orpo) or beta * pi (cpo). Lengths of 0 count as 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from vlrlhf.losses.aggregation import upcast

REFERENCE_FREE = ("simpo", "cpo", "orpo", "sft")
NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "simpo", "orpo", "sft")
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_pair", "apo_zero", "apo_down", "discopop", "sigmoid_norm") + REFERENCE_FREE


@dataclasses.dataclass
class PreferenceOutput:
    losses: torch.Tensor  # (B,) weighted sum of the terms, per pair
    chosen_rewards: torch.Tensor  # (B,) implicit reward of the chosen answer (detached)
    rejected_rewards: torch.Tensor  # (B,) implicit reward of the rejected answer (detached)
    terms: dict[str, torch.Tensor]  # (B,) each unweighted term, by loss type


class RunningMean:
    """Running mean of rewards across steps: BCO's baseline delta (detached).

    `update(values)` folds a batch in and returns the new mean (the batch is counted
    before it is used, as in the BCO paper's algorithm).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0

    def update(self, values: torch.Tensor) -> float:
        values = values.detach().float()
        n = values.numel()
        if n:
            self.count += n
            self.mean += (values.sum().item() - n * self.mean) / self.count
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
    unknown = [name for name in weights if name not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_type {unknown[0]!r} is not one of {', '.join(LOSS_TYPES)}")
    return weights


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
             rejected_lengths: torch.Tensor | None = None, gamma: float = 0.5, discopop_tau: float = 0.05,
             baseline: RunningMean | None = None) -> PreferenceOutput:
    """Preference loss per pair; see the module docstring for every type's formula.

    Inputs are (B,) summed log-probs; lengths (B,) token counts. `gamma` is SimPO's
    target margin, `discopop_tau` the LRML temperature, `baseline` BCO's running mean.
    """
    weights = normalise_loss_types(loss_type)
    _check_inputs({"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
                   "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
                   "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths})
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
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

    terms: dict[str, torch.Tensor] = {}
    for name in weights:
        if name == "sigmoid":
            term = _smoothed_sigmoid(beta * h, eps)
        elif name == "robust":
            if eps >= 0.5:
                raise ValueError(f"label_smoothing={eps} must be < 0.5 for loss_type 'robust'")
            term = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        elif name == "hinge":
            term = F.relu(1 - beta * h)
        elif name == "ipo":
            term = (length_normalised_margin() - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            if not 0 < eps < 1:
                raise ValueError(f"label_smoothing={eps} must lie in (0, 1) for loss_type 'exo_pair' "
                                 "(it is EXO's epsilon; 1e-3 is usual)")
            x = beta * h
            term = (torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1 - eps))
                    + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
        elif name == "nca_pair":
            term = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
        elif name == "bco_pair":
            rewards = torch.cat([beta * a, beta * b]).detach()
            delta = baseline.update(rewards) if baseline is not None else rewards.mean()
            term = -F.logsigmoid(beta * a - delta) - F.logsigmoid(-(beta * b - delta))
        elif name == "sppo_hard":
            term = (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
        elif name == "aot":
            delta = torch.sort(pi_c - pi_r).values - torch.sort(ref_c - ref_r).values
            term = _smoothed_sigmoid(beta * delta, eps)
        elif name == "aot_pair":
            delta = torch.sort(a).values - torch.sort(b).values
            term = _smoothed_sigmoid(beta * delta, eps)
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
            term = -F.logsigmoid(beta * (pi_c - pi_r))
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
    normalised types the corrupted answer has the chosen answer's length.
    """
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


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, is_desirable: torch.Tensor,
             kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOOutput:
    """KTO (Ethayarajh+ 2024), unpaired.

    r = pi - ref (summed log-probs, (B,)); z_ref = max(0, mean(kl_pi - kl_ref)), detached,
    where kl_* are log-probs of MISMATCHED pairs (prompt i with the completion of another
    example), an estimate of KL(pi || ref) on this batch.
      desirable:    w_d (1 - s(beta (r - z_ref)))
      undesirable:  w_u (1 - s(beta (z_ref - r)))
    Batch size: the KL estimate needs mismatched pairs, so a batch of 1 is refused; the
    estimate is noisy below ~8 examples (the paper uses >= 32; with data parallelism,
    gather kl_* across ranks before calling).
    """
    batch = _check_inputs({"policy_logps": policy_logps, "ref_logps": ref_logps, "is_desirable": is_desirable})
    _check_inputs({"kl_policy_logps": kl_policy_logps, "kl_ref_logps": kl_ref_logps})
    if batch < 2 or kl_policy_logps.numel() < 2:
        raise ValueError(f"policy_logps has batch size {batch}: KTO needs at least 2 examples per batch "
                         "to form mismatched pairs for its KL reference point")
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    z_ref = (upcast(kl_policy_logps) - upcast(kl_ref_logps)).mean().clamp(min=0).detach()
    r = upcast(policy_logps) - upcast(ref_logps)
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

"""Direct preference optimisation losses over sequence log-probs, as TRL's DPOTrainer defines them.

All inputs are [P] (one entry per preference pair): the summed log-prob of the chosen and
of the rejected completion under the policy and under the frozen reference. With
h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected) and smoothing e:

- `sigmoid` (DPO, Rafailov et al. 2023, arXiv:2305.18290 eq. 7): -log sigma(beta h); with
  e > 0 the conservative cDPO form -(1 - e) log sigma(beta h) - e log sigma(-beta h)
  (Mitchell 2023; TRL 0.x's `label_smoothing` for sigmoid: TRL 1.x dropped it there);
- `robust` (Chowdhury et al. 2024, arXiv:2403.00409 eq. 8, TRL's "robust"):
  (-(1 - e) log sigma(beta h) + e log sigma(-beta h)) / (1 - 2e), e in [0, 0.5);
- `hinge` (SLiC, Zhao et al. 2023, arXiv:2305.10425): relu(1 - beta h);
- `ipo` (Azar et al. 2023, arXiv:2310.12036 eq. 17, beta = tau): (h - 1 / (2 beta))^2. TRL
  1.x feeds IPO length-normalised scores: pass per-token MEAN log-probs for `ipo` to match.

The losses are per pair (mean them for a step, or divide their sum by a global pair count
under data parallelism); `dpo_implicit_rewards` gives the logged rewards beta * log-ratio.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: DPOLossType | str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO-family losses [P] (see the module docstring for each `loss_type`)."""
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps,
                                       ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-prob tensors must be equal-length 1-D [P]; got shapes "
                         f"{sorted(shapes)}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5)")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing={label_smoothing} has no meaning for loss_type="
                         f"{loss_type!r} (only sigmoid and robust use it)")
    logits = ((policy_chosen_logps - policy_rejected_logps)
              - (ref_chosen_logps - ref_rejected_logps))
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
        if label_smoothing:
            losses = (losses * (1 - label_smoothing)
                      - F.logsigmoid(-beta * logits) * label_smoothing)
        return losses
    if loss_type == "robust":
        return ((-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                 + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing))
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2  # ipo


def dpo_implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi - log pi_ref) per completion [P], no gradient
    (TRL's `rewards/chosen`, `rewards/rejected`; margin = chosen - rejected)."""
    return beta * (policy_logps - ref_logps).detach()

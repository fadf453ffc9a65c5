"""The DPO loss shared by Diffusion-DPO and every Inversion-DPO target: tensors in, (loss, metrics) out.

Diffusion-DPO (Wallace et al., arXiv 2311.12908, eq. 14) writes the preference log-odds of a pair through the
denoising errors of the policy and the frozen reference on the winner (w) and the loser (l):

    inside = -0.5 * beta * ((Lp_w - Lp_l) - (Lr_w - Lr_l))

where each L is a per-sample mean squared error. At policy == reference, inside == 0 and the sigmoid loss is
ln 2 = 0.693: that is the starting point, not a bug.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F

from invdpo_core.config import LossType

LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss on per-sample errors of shape (B,); returns the mean loss and detached metrics."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    shapes = {t.shape for t in (policy_err_w, policy_err_l, ref_err_w, ref_err_l)}
    assert len(shapes) == 1 and policy_err_w.dim() == 1, f"expected four (B,) tensors, got shapes {shapes}"

    # Implicit rewards: beta * log(pi_theta / pi_ref), which the diffusion ELBO turns into -0.5 * beta * (Lp - Lr).
    reward_w = -0.5 * beta * (policy_err_w - ref_err_w)
    reward_l = -0.5 * beta * (policy_err_l - ref_err_l)
    inside = reward_w - reward_l  # = -0.5 * beta * ((Lp_w - Lp_l) - (Lr_w - Lr_l))

    if loss_type == "sigmoid":
        # DPO (Rafailov et al., arXiv 2305.18290, eq. 7); the mean goes OUTSIDE the logsigmoid.
        loss = -F.logsigmoid(inside).mean()
    elif loss_type == "hinge":
        # SLiC-style hinge on the same margin (the hinge branch of the Diffusion-DPO training scripts).
        loss = torch.relu(1 - inside).mean()
    else:
        # IPO (Azar et al., arXiv 2310.12036, eq. 17): regress the unscaled log-ratio difference, inside / beta,
        # to 1 / (2 beta). (The script family this mirrors crashes here on an undefined `args.beta`.)
        loss = (inside / beta - 1 / (2 * beta)).pow(2).mean()

    with torch.no_grad():
        # Ties (inside == 0, e.g. at initialisation) count as half a correct pair.
        acc = (inside > 0).float() + 0.5 * (inside == 0).float()
        metrics = {
            "implicit_acc": acc.mean(),
            "rewards/chosen": reward_w.mean(),
            "rewards/rejected": reward_l.mean(),
            "rewards/margins": inside.mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}

import math

import pytest
import torch

from invdpo_core.losses import LOSS_TYPES, dpo_loss

# Hand-computed case: beta 10, policy errs w=(0.1, 0.3), l=(0.2, 0.1); reference errs w=(0.15, 0.2), l=(0.15, 0.2).
# inside = -0.5*10*((Lp_w - Lp_l) - (Lr_w - Lr_l)) = -5*((-0.1) - 0) = 0.5 and -5*((0.2) - 0) = -1.0
POLICY_W, POLICY_L = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.1])
REF_W, REF_L = torch.tensor([0.15, 0.2]), torch.tensor([0.15, 0.2])
INSIDE = (0.5, -1.0)


def softplus(x):
    return math.log1p(math.exp(x))


EXPECTED = {
    # -logsigmoid(x) = softplus(-x)
    "sigmoid": (softplus(-0.5) + softplus(1.0)) / 2,
    # relu(1 - x)
    "hinge": (max(0.0, 1 - 0.5) + max(0.0, 1 + 1.0)) / 2,
    # (x / beta - 1 / (2 beta))^2 with beta 10
    "ipo": ((0.05 - 0.05) ** 2 + (-0.1 - 0.05) ** 2) / 2,
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_matches_hand_computation(loss_type):
    loss, metrics = dpo_loss(POLICY_W, POLICY_L, REF_W, REF_L, beta=10.0, loss_type=loss_type)
    assert loss.item() == pytest.approx(EXPECTED[loss_type], rel=1e-6)
    assert metrics["implicit_acc"].item() == pytest.approx(0.5)  # one pair right, one wrong
    assert metrics["rewards/margins"].item() == pytest.approx(sum(INSIDE) / 2, rel=1e-6)
    # rewards/chosen = -0.5*beta*(Lp_w - Lr_w): -5*(-0.05)=0.25 and -5*(0.1)=-0.5
    assert metrics["rewards/chosen"].item() == pytest.approx((0.25 - 0.5) / 2, rel=1e-6)
    assert metrics["rewards/rejected"].item() == pytest.approx((-0.25 + 0.5) / 2, rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_equal_reference_is_the_starting_point(loss_type):
    err = torch.rand(8)
    other = torch.rand(8)
    loss, metrics = dpo_loss(err, other, err.clone(), other.clone(), beta=5000.0, loss_type=loss_type)
    assert metrics["implicit_acc"].item() == 0.5  # ties count half
    assert metrics["rewards/margins"].item() == 0.0
    if loss_type == "sigmoid":
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_gradient_lowers_winner_error_and_raises_loser_error():
    pw, pl = torch.tensor([0.2], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    loss, _ = dpo_loss(pw, pl, torch.tensor([0.2]), torch.tensor([0.2]), beta=100.0)
    loss.backward()
    assert pw.grad.item() > 0 and pl.grad.item() < 0  # descent decreases Lp_w, increases Lp_l


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        dpo_loss(POLICY_W, POLICY_L, REF_W, REF_L, beta=1.0, loss_type="kto")

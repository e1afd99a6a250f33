"""Selection loss: ASL against a scalar reference, BCE equivalence, ancestor masking."""

import math

import pytest
import torch
import torch.nn.functional as F

from cqdino.modeling import SelectionLoss, asymmetric_loss, image_level_targets


def _asl_scalar(x, y, gamma_neg, gamma_pos, clip, eps=1e-8):
    """One entry of ASL, plain Python floats."""
    x = max(-88.0, min(88.0, x))
    p = 1.0 / (1.0 + math.exp(-x))
    if y:
        return -((1 - p) ** gamma_pos) * math.log(max(p, eps))
    pm = max(p - clip, 0.0)
    return -(pm**gamma_neg) * math.log(max(1 - pm, eps))


def _asl_grad_scalar(x, y, gamma_neg, gamma_pos, clip):
    """d loss / d x with the focusing weight held constant (detached)."""
    p = 1.0 / (1.0 + math.exp(-x))
    if y:
        return -((1 - p) ** gamma_pos) * (1 - p)
    pm = p - clip
    if pm <= 0:
        return 0.0
    return (pm**gamma_neg) * p * (1 - p) / (1 - pm)


LOGITS = [[-3.0, -0.2, 0.0, 1.5, 4.0], [2.5, -1.0, -6.0, 0.3, -2.9]]
TARGETS = [[0, 1, 0, 1, 0], [1, 0, 0, 0, 1]]


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(7, 0, 0.05), (4, 1, 0.05), (2, 0, 0.3)])
def test_asl_matches_scalar_reference_and_detached_gradient(gamma_neg, gamma_pos, clip):
    x = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(TARGETS, dtype=torch.bool)
    loss = asymmetric_loss(x, y, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    expected = sum(
        _asl_scalar(xv, yv, gamma_neg, gamma_pos, clip)
        for xr, yr in zip(LOGITS, TARGETS)
        for xv, yv in zip(xr, yr)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    grad = [
        [_asl_grad_scalar(xv, yv, gamma_neg, gamma_pos, clip) for xv, yv in zip(xr, yr)]
        for xr, yr in zip(LOGITS, TARGETS)
    ]
    torch.testing.assert_close(x.grad, torch.tensor(grad, dtype=torch.float64))


def test_asl_without_focusing_is_bce():
    torch.manual_seed(0)
    x = torch.randn(3, 50, dtype=torch.float64) * 4
    y = torch.rand(3, 50) < 0.2
    loss = asymmetric_loss(x, y, gamma_neg=0, gamma_pos=0, clip=0)
    bce = F.binary_cross_entropy_with_logits(x, y.double(), reduction="sum")
    torch.testing.assert_close(loss, bce, rtol=1e-9, atol=1e-9)
    coco = SelectionLoss.coco()
    torch.testing.assert_close(coco(x, y), 0.1 * bce, rtol=1e-9, atol=1e-9)
    # float {0, 1} targets work as bool ones
    torch.testing.assert_close(coco(x, y.double()), coco(x, y))


def test_asl_extreme_logits_are_finite():
    x = torch.tensor([[1e4, -1e4, 90.0, -90.0]], requires_grad=True)
    y = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    loss = asymmetric_loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # clamp at +-88: the logits beyond it get no gradient
    assert torch.all(x.grad == 0)
    # a very confident wrong negative costs ~ -log(eps)-ish, not inf
    assert loss.item() > 10


def test_ancestor_masking_hand_made():
    # hierarchy: 0 animal -> {1 dog, 2 cat}; 3 vehicle -> {4 car}; 5 apple (no parent)
    parent = {1: 0, 2: 0, 4: 3}

    def ancestor_mask(targets):  # ancestors of positives that are not positive themselves
        ign = torch.zeros_like(targets)
        for b, c in targets.nonzero().tolist():
            a = parent.get(c)
            while a is not None:
                ign[b, a] = True
                a = parent.get(a)
        return ign & ~targets

    x = torch.tensor(
        [[-1.0, 2.0, -0.5, 0.7, -2.0, 0.1], [1.2, -0.3, 0.9, 2.2, 1.1, -4.0]], dtype=torch.float64
    )
    y = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    # image 0: dog -> animal ignored; image 1: animal and cat labelled, car -> vehicle ignored
    expected_ignore = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(ancestor_mask(y), expected_ignore)
    expected = sum(
        _asl_scalar(x[b, c].item(), bool(y[b, c]), 7, 0, 0.05)
        for b in range(2)
        for c in range(6)
        if not expected_ignore[b, c]
    )
    loss_fn = SelectionLoss.v3det(ignore_fn=ancestor_mask)
    assert loss_fn(x, y).item() == pytest.approx(expected, rel=1e-10)
    # same result with a precomputed mask or a per-call callable; the per-call one wins
    plain = SelectionLoss.v3det()
    assert plain(x, y, ignore=expected_ignore).item() == pytest.approx(expected, rel=1e-10)
    assert plain(x, y, ignore=ancestor_mask).item() == pytest.approx(expected, rel=1e-10)
    nothing = torch.zeros_like(y)
    assert loss_fn(x, y, ignore=nothing).item() == pytest.approx(plain(x, y).item(), rel=1e-12)
    assert plain(x, y).item() > expected  # the masked ancestors were costly negatives
    # ignored entries get no gradient
    xg = x.clone().requires_grad_(True)
    loss_fn(xg, y).backward()
    xp = x.clone().requires_grad_(True)
    plain(xp, y).backward()
    assert torch.all(xg.grad[expected_ignore] == 0) and torch.all(xp.grad[expected_ignore] != 0)
    torch.testing.assert_close(xg.grad[~expected_ignore], xp.grad[~expected_ignore])


def test_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        asymmetric_loss(x, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ignore"):
        asymmetric_loss(x, torch.zeros(2, 3, dtype=torch.bool), ignore=torch.zeros(2, 3))


def test_image_level_targets():
    t = image_level_targets([torch.tensor([2, 0, 2]), torch.tensor([], dtype=torch.long)], 4)
    assert t.tolist() == [[True, False, True, False], [False] * 4]
    # checked with an asynchronous assert (no host sync on GPUs; raises at once on the CPU)
    for bad in (4, -1):
        with pytest.raises(RuntimeError, match=r"out of \[0, 4\)"):
            image_level_targets([torch.tensor([1]), torch.tensor([bad])], 4)


def test_half_precision_logits():
    x = torch.tensor(LOGITS, dtype=torch.float16)
    y = torch.tensor(TARGETS, dtype=torch.bool)
    loss = asymmetric_loss(x, y)
    assert loss.dtype == torch.float32
    ref = asymmetric_loss(x.double(), y)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)

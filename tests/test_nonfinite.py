"""A diverging sampling-offset head surfaces as a non-finite loss in detectron2's training loop,
although ``ms_deform_attn`` itself treats non-finite locations as off the map."""

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from cqdino.layers import MultiScaleDeformableAttention

from .modeling.utils import batch, tiny_dino


def _tiny():
    torch.manual_seed(0)
    return tiny_dino(
        num_classes=5, num_queries=8, layers=1, embed_dim=64, ffn_dim=64, dn_number=4, width=16
    )


def _one_step(model, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = SimpleTrainer(model, [data], opt)
    with EventStorage(0) as trainer.storage:
        trainer.iter = 0
        trainer.run_step()


# With ground truth the matcher's non-finite-cost check stops the step first; without ground
# truth (no matching) detectron2's check on the summed losses does, naming the loss terms.
CHECKS = {
    "with_gt": (3, r"HungarianMatcher: non-finite matching cost"),
    "no_gt": (
        0,
        r"(?s)Loss became infinite or NaN at iteration=0.*'loss_class': (np.float64\()?nan",
    ),
}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("where", ["encoder", "decoder"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_trainer_catches_a_diverging_offset_head(check, where, bad):
    num_boxes, message = CHECKS[check]
    model = _tiny()
    data = batch([(64, 80, num_boxes), (72, 64, num_boxes)], num_classes=5)
    _one_step(model, data)  # healthy: a finite step
    attn = [
        m
        for name, m in model.named_modules()
        if isinstance(m, MultiScaleDeformableAttention) and f"{where}" in name
    ]
    assert attn, where
    with torch.no_grad():
        attn[0].sampling_offsets.bias[3] = bad  # one offset of one head, level and point
    with pytest.raises(FloatingPointError, match=message):
        _one_step(model, data)

"""The library's observers (what diagnostics tools use instead of patching methods):
``SetCriterion.observe`` sees every prediction set's loss arguments, ``DINO.observe_class_state``
every class-head state; the losses are unchanged and nothing is seen outside the block."""

import torch

from .cqdino_utils import tiny_cqdino
from .utils import batch


def _losses(model, inputs):
    torch.manual_seed(0)
    return {k: float(v.detach()) for k, v in model(inputs).items()}


def test_observers_see_every_prediction_set_and_the_state():
    C, K, layers = 6, 3, 2
    torch.manual_seed(0)
    model = tiny_cqdino(C, topk=K, num_queries=12, dn_number=4, layers=layers).train()
    inputs = batch([(64, 80, 2), (72, 64, 3)], C)
    plain = _losses(model, inputs)
    seen, states = [], []

    def loss_set(pred_logits, targets, indices, num_boxes, quality):
        seen.append((tuple(pred_logits.shape), quality, [len(q) for q, _ in indices]))

    with model.criterion.observe(loss_set), model.observe_class_state(states.append):
        observed = _losses(model, inputs)
    assert observed == plain  # observing changes nothing
    # one call per loss_class term: last layer, layers-1 aux layers, encoder, DN layers
    class_terms = [k for k in plain if k.startswith("loss_class")]
    assert len(seen) == len(class_terms) == 1 + (layers - 1) + 1 + layers
    assert [q for _, q, _ in seen] == [True] * (layers + 1) + [False] * layers  # DN: no quality
    # CQ-DINO's columns are the K selected categories of each image
    assert all(shape[0] == 2 and shape[-1] == K for shape, _, _ in seen)
    assert [n for n in seen[0][2]] == [2, 3]  # every GT matched in the last layer
    assert len(states) == 1 and tuple(states[0].indices.shape) == (2, K)
    # outside the block nothing is observed any more
    _losses(model, inputs)
    assert len(seen) == 1 + (layers - 1) + 1 + layers and len(states) == 1

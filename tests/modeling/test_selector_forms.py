"""The selector's score forms against float64 references written out here, its prior bias, the
dense targets on a hand-built grid and the dense focal loss against torchvision's."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from cqdino.modeling.cqdino.contrastive_head import dense_focal_loss, dense_targets
from cqdino.modeling.cqdino.selector import CategorySelector

C, D, M, CIN = 7, 16, 12, 10


def _selector(form, prior=None):
    torch.manual_seed(0)
    return CategorySelector(
        CIN,
        num_topk=3,
        query_dim=D,
        memory_dim=M,
        num_heads=2,
        ffn_dim=32,
        num_layers=1,
        out_dim=8,
        score_form=form,
        num_categories=C,
        prior=prior,
    ).double()


def _ln(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + 1e-5
    )


@pytest.mark.parametrize("form", ["bilinear", "dense", "dense+bilinear"])
def test_score_forms_match_a_float64_reference(form):
    sel = _selector(form)
    for p in sel.parameters():  # non-trivial norms and bias
        p.data.uniform_(-0.5, 0.5)
    q = torch.randn(C, D, dtype=torch.float64)
    feats = torch.randn(2, CIN, 3, 4, dtype=torch.float64)
    pad = torch.zeros(2, 3, 4, dtype=torch.bool)
    pad[1, :, 3:] = True  # image 1: last column is padding
    encoded = sel.encode(q, feats, pad)
    scores, dense = sel.score_categories(q, encoded, feats, pad)
    ref = sel.category_bias[None].expand(2, C).clone()
    if "bilinear" in form:
        n = sel.score_norm
        x = _ln(encoded) * n.weight + n.bias
        ref = ref + (x * (q @ sel.score_query.weight.T)[None]).sum(-1) / math.sqrt(D)
    if "dense" in form:
        tokens = feats.flatten(2).transpose(1, 2) @ sel.input_proj.weight.T + sel.input_proj.bias
        m = _ln(tokens) * sel.dense_norm.weight + sel.dense_norm.bias  # (B, N, M)
        w = q @ sel.dense_query.weight.T  # (C, M)
        sim = torch.einsum("bnm,cm->bcn", m, w) / math.sqrt(M)
        torch.testing.assert_close(dense, sim)
        valid = ~pad.flatten(1)
        best = torch.stack([sim[b][:, valid[b]].max(-1).values for b in range(2)])
        ref = ref + best
    else:
        assert dense is None
    torch.testing.assert_close(scores, ref)


def test_prior_bias_is_the_logit_of_the_frequency():
    prior = [0.0, 1e-3, 0.01, 0.2, 0.5, 0.9, 1.0]
    sel = _selector("dense", prior)
    p = torch.tensor(prior, dtype=torch.float64).clamp(1e-4, 0.5)
    torch.testing.assert_close(sel.category_bias.detach(), torch.log(p / (1 - p)))
    with pytest.raises(ValueError, match="per-category bias"):
        _selector("linear", prior)
    with pytest.raises(ValueError, match="7 categories"):
        _selector("dense", prior[:3])


def test_dense_targets_hand_built():
    # a 4 x 4 grid at stride 8 of a 32 x 32 image; cell centres at 4, 12, 20, 28 px
    boxes = (
        torch.tensor(
            [
                [
                    8.0,
                    8.0,
                    16.0,
                    16.0,
                ],  # xyxy 0..16: holds the centres of cells (0,0) (0,1) (1,0) (1,1)
                [28.0, 28.0, 2.0, 2.0],  # 27..29: holds the centre of cell (3,3)
                [
                    17.0,
                    1.0,
                    2.0,
                    2.0,
                ],  # 16..18 x 0..2: no centre inside; its own centre is in (0,2)
            ]
        )
        / 32.0
    )  # cxcywh normalised
    cls = torch.tensor([1, 2, 1])
    t = dense_targets([cls, cls[:0]], [boxes, boxes[:0]], [(32, 32), (32, 32)], (4, 4), 8, 3)
    expect = torch.zeros(2, 3, 16)
    expect[0, 1, [0, 1, 4, 5, 2]] = 1.0
    expect[0, 2, 15] = 1.0
    torch.testing.assert_close(t, expect)


def test_dense_focal_loss_matches_torchvision():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6)
    targets = (torch.rand(2, 5, 6) < 0.2).float()
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ref = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    ref = (ref * valid[:, None].float()).sum()
    torch.testing.assert_close(dense_focal_loss(logits, targets, valid), ref)

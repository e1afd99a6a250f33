"""Image <-> category fusion blocks: shapes, masking, and explicit float64 references."""

import math

import pytest
import torch

from cqdino.modeling.fusion import (
    CategoryCrossAttention,
    ImageCategoryFusion,
    MultiheadCrossAttention,
    masked_softmax,
)


def _lin(x, lin):
    return x @ lin.weight.T + lin.bias


def _ln(x, norm):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _reference_fusion(m, image, category, pad, valid):
    """Per-image, per-head loop over the *kept* tokens only (float64)."""
    B = image.shape[0]
    out_img, out_cat = image.clone(), category.clone()
    h, dh = m.num_heads, m.head_dim
    for b in range(B):
        ki = (~pad[b]).nonzero().flatten()
        kc = valid[b].nonzero().flatten()
        xi = _ln(image[b], m.image_norm)
        xc = _ln(category[b], m.category_norm)
        q = _lin(xi, m.image_query).view(-1, h, dh)
        k = _lin(xc, m.category_key).view(-1, h, dh)
        vi = _lin(xi, m.image_value).view(-1, h, dh)
        vc = _lin(xc, m.category_value).view(-1, h, dh)
        d_img = torch.zeros(image.shape[1], h, dh, dtype=image.dtype)
        d_cat = torch.zeros(category.shape[1], h, dh, dtype=image.dtype)
        for j in range(h):
            logits = q[:, j] @ k[:, j].T / math.sqrt(dh)  # (N, K)
            if len(kc):
                d_img[:, j] = torch.softmax(logits[:, kc], 1) @ vc[kc, j]
            if len(ki):
                d_cat[:, j] = torch.softmax(logits[ki].T, 1) @ vi[ki, j]
        out_img[b] += m.image_gamma * _lin(d_img.flatten(1), m.image_out)
        out_cat[b] += m.category_gamma * _lin(d_cat.flatten(1), m.category_out)
    return out_img, out_cat


def _fusion_inputs(B=2, N=7, K=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    category = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, 5:] = True
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[1, 3:] = True
    valid[0, 4:] = False
    valid[1, 2:] = False
    return image, category, pad, valid


def _fusion(**kw):
    m = ImageCategoryFusion(16, 16, embed_dim=32, num_heads=4, **kw).double()
    # larger layer scale so the attention update is visible in the comparisons
    with torch.no_grad():
        m.image_gamma.fill_(0.7)
        m.category_gamma.fill_(-0.3)
    return m


def test_fusion_matches_reference():
    m = _fusion()
    image, category, pad, valid = _fusion_inputs()
    img, cat = m(image, category, pad, valid)
    assert img.shape == image.shape and cat.shape == category.shape
    ref_img, ref_cat = _reference_fusion(m, image, category, pad, valid)
    torch.testing.assert_close(img, ref_img)
    torch.testing.assert_close(cat, ref_cat)


def test_fusion_padding_does_not_leak():
    m = _fusion()
    image, category, pad, valid = _fusion_inputs()
    img, cat = m(image, category, pad, valid)
    image2, category2 = image.clone(), category.clone()
    image2[pad] = 1e4 * torch.randn_like(image2[pad])
    category2[~valid] = -1e4 * torch.randn_like(category2[~valid])
    img2, cat2 = m(image2, category2, pad, valid)
    torch.testing.assert_close(img2[~pad], img[~pad])
    torch.testing.assert_close(cat2[valid], cat[valid])


def test_fusion_without_masks_and_layer_scale_init():
    m = ImageCategoryFusion(16, 24, embed_dim=32, num_heads=4)
    one_e4 = torch.tensor(1e-4)  # float32, like the parameters
    assert torch.all(m.image_gamma == one_e4) and torch.all(m.category_gamma == one_e4)
    m = m.double()
    image = torch.randn(2, 6, 16, dtype=torch.float64)
    category = torch.randn(2, 3, 24, dtype=torch.float64)
    img, cat = m(image, category)
    no_pad = torch.zeros(2, 6, dtype=torch.bool)
    all_valid = torch.ones(2, 3, dtype=torch.bool)
    img_m, cat_m = m(image, category, no_pad, all_valid)
    torch.testing.assert_close(img, img_m)
    torch.testing.assert_close(cat, cat_m)
    assert (img - image).abs().max() < 1e-2  # layer scale 1e-4 keeps the first update small


def test_fusion_all_categories_invalid_is_finite():
    m = _fusion()
    image, category, pad, _ = _fusion_inputs()
    none = torch.zeros(2, 5, dtype=torch.bool)
    img, cat = m(image, category, pad, none)
    assert torch.isfinite(img).all() and torch.isfinite(cat).all()
    torch.testing.assert_close(img, image)  # nothing to read: image tokens unchanged


def test_fusion_gradients_and_bad_masks():
    m = _fusion(drop_path=0.1, dropout=0.1).train()
    image, category, pad, valid = _fusion_inputs()
    image.requires_grad_(True)
    category.requires_grad_(True)
    img, cat = m(image, category, pad, valid)
    (img.square().sum() + cat.square().sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert image.grad is not None and category.grad is not None
    with pytest.raises(ValueError, match="image_padding_mask"):
        m(image, category, pad.float(), valid)
    with pytest.raises(ValueError, match="category_valid_mask"):
        m(image, category, pad, valid[:, :2])


def test_multihead_cross_attention_matches_torch_mha():
    torch.manual_seed(0)
    D, Dk, h = 16, 12, 4
    ours = MultiheadCrossAttention(D, Dk, h).double().eval()
    mha = torch.nn.MultiheadAttention(D, h, kdim=Dk, vdim=Dk, batch_first=True).double().eval()
    with torch.no_grad():
        mha.q_proj_weight.copy_(ours.q_proj.weight)
        mha.k_proj_weight.copy_(ours.k_proj.weight)
        mha.v_proj_weight.copy_(ours.v_proj.weight)
        mha.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        mha.out_proj.weight.copy_(ours.out_proj.weight)
        mha.out_proj.bias.copy_(ours.out_proj.bias)
    q = torch.randn(3, 5, D, dtype=torch.float64)
    k = torch.randn(3, 9, Dk, dtype=torch.float64)
    valid = torch.rand(3, 9) > 0.3
    valid[:, 0] = True
    expected = mha(q, k, k, key_padding_mask=~valid, need_weights=False)[0]
    torch.testing.assert_close(ours(q, k, key_valid=valid), expected)
    torch.testing.assert_close(ours(q, k), mha(q, k, k, need_weights=False)[0])


def test_category_cross_attention_block():
    torch.manual_seed(1)
    blk = CategoryCrossAttention(16, 4).double().eval()
    q = torch.randn(2, 6, 16, dtype=torch.float64)
    pos = torch.randn(2, 6, 16, dtype=torch.float64)
    cat = torch.randn(2, 5, 16, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    out = blk(q, cat, valid, pos)
    # explicit reference: residual on the content query, attention query = content + pos
    a = blk.attn
    ref = []
    for b in range(2):
        kk = valid[b].nonzero().flatten()
        qh = _lin(q[b] + pos[b], a.q_proj).view(6, 4, 4)
        kh = _lin(cat[b, kk], a.k_proj).view(-1, 4, 4)
        vh = _lin(cat[b, kk], a.v_proj).view(-1, 4, 4)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", qh, kh) / 2.0, -1)
        o = torch.einsum("hqk,khd->qhd", att, vh).reshape(6, 16)
        ref.append(_ln(q[b] + _lin(o, a.out_proj), blk.norm))
    torch.testing.assert_close(out, torch.stack(ref))
    # invalid category slots do not matter
    cat2 = cat.clone()
    cat2[~valid] = 1e4
    torch.testing.assert_close(blk(q, cat2, valid, pos), out)
    # no valid category: only the LayerNorm of the query remains, no NaN
    none = blk(q, cat, torch.zeros(2, 5, dtype=torch.bool), pos)
    torch.testing.assert_close(none, _ln(q, blk.norm))


def test_masked_softmax_rows():
    x = torch.randn(2, 3, dtype=torch.float64)
    keep = torch.tensor([[True, False, True], [False, False, False]])
    p = masked_softmax(x, keep)
    torch.testing.assert_close(p[0, [0, 2]], torch.softmax(x[0, [0, 2]], 0))
    assert p[0, 1] == 0 and torch.all(p[1] == 0)

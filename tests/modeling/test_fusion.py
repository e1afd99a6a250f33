"""Image <-> category fusion blocks: shapes, masking, and explicit float64 references (the
encoder fusion against the authors' bi-attention block written out here)."""

import math

import pytest
import torch

from cqdino.modeling import CategoryCrossAttention, ImageCategoryFusion, MultiheadCrossAttention
from cqdino.modeling.cqdino.fusion import masked_softmax


def _lin(x, lin):
    return x @ lin.weight.T + lin.bias


def _ln(x, norm):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _authors_bi_attention(m, image, category, pad):
    """The authors' bi-attention block written out per image and per head over the kept image
    tokens only (float64): both inputs LayerNormed, one shared logit matrix, each side's update
    added to its *normed* input through the layer scale, ``v = LN(v) + g_v * dv`` and
    ``l = LN(l) + g_l * dl``."""
    out_img, out_cat = [], []
    h, dh = m.num_heads, m.head_dim
    for b in range(image.shape[0]):
        ki = [i for i in range(image.shape[1]) if not pad[b, i]]
        v = _ln(image[b], m.image_norm)
        lang = _ln(category[b], m.category_norm)
        q = _lin(v, m.image_query).view(-1, h, dh)
        k = _lin(lang, m.category_key).view(-1, h, dh)
        vv = _lin(v, m.image_value).view(-1, h, dh)
        vl = _lin(lang, m.category_value).view(-1, h, dh)
        d_img = torch.zeros(image.shape[1], h, dh, dtype=image.dtype)
        d_cat = torch.zeros(category.shape[1], h, dh, dtype=image.dtype)
        for j in range(h):
            logits = q[:, j] @ k[:, j].T / math.sqrt(dh)  # (N, K)
            d_img[:, j] = torch.softmax(logits, 1) @ vl[:, j]
            if ki:
                d_cat[:, j] = torch.softmax(logits[ki].T, 1) @ vv[ki, j]
        out_img.append(v + m.image_gamma * _lin(d_img.flatten(1), m.image_out))
        out_cat.append(lang + m.category_gamma * _lin(d_cat.flatten(1), m.category_out))
    return torch.stack(out_img), torch.stack(out_cat)


def _fusion_inputs(B=2, N=7, K=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # off-centre, wide inputs: a LayerNorm visibly changes them
    image = 3.0 + 2.0 * torch.randn(B, N, D, generator=g, dtype=torch.float64)
    category = -1.0 + 4.0 * torch.randn(B, K, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, 5:] = True
    return image, category, pad


def _fusion(**kw):
    m = ImageCategoryFusion(16, 16, embed_dim=32, num_heads=4, **kw).double()
    # larger layer scale and non-trivial norms so every term shows in the comparisons
    with torch.no_grad():
        m.image_gamma.fill_(0.7)
        m.category_gamma.fill_(-0.3)
        for norm in (m.image_norm, m.category_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return m


def test_fusion_matches_the_authors_bi_attention_block():
    m = _fusion()
    image, category, pad = _fusion_inputs()
    img, cat = m(image, category, pad)
    assert img.shape == image.shape and cat.shape == category.shape
    ref_img, ref_cat = _authors_bi_attention(m, image, category, pad)
    torch.testing.assert_close(img, ref_img)
    torch.testing.assert_close(cat, ref_cat)
    # the residual is on the normed inputs: with zero layer scale both outputs are LN(input)
    with torch.no_grad():
        m.image_gamma.zero_()
        m.category_gamma.zero_()
    img0, cat0 = m(image, category, pad)
    torch.testing.assert_close(img0, _ln(image, m.image_norm))
    torch.testing.assert_close(cat0, _ln(category, m.category_norm))
    assert (cat0 - category).abs().max() > 1.0  # and that differs from the un-normed input


def test_fusion_padding_does_not_leak():
    m = _fusion()
    image, category, pad = _fusion_inputs()
    img, cat = m(image, category, pad)
    image2 = image.clone()
    image2[pad] = 1e4 * torch.randn_like(image2[pad])
    img2, cat2 = m(image2, category, pad)
    torch.testing.assert_close(img2[~pad], img[~pad])
    torch.testing.assert_close(cat2, cat)


def test_fusion_without_mask_and_layer_scale_init():
    m = ImageCategoryFusion(16, 24, embed_dim=32, num_heads=4)
    one_e4 = torch.tensor(1e-4)  # float32, like the parameters
    assert torch.all(m.image_gamma == one_e4) and torch.all(m.category_gamma == one_e4)
    m = m.double()
    image = torch.randn(2, 6, 16, dtype=torch.float64)
    category = torch.randn(2, 3, 24, dtype=torch.float64)
    img, cat = m(image, category)
    img_m, cat_m = m(image, category, torch.zeros(2, 6, dtype=torch.bool))
    torch.testing.assert_close(img, img_m)
    torch.testing.assert_close(cat, cat_m)
    # layer scale 1e-4 keeps the first update small: outputs are close to the normed inputs
    assert (img - _ln(image, m.image_norm)).abs().max() < 1e-2
    assert (cat - _ln(category, m.category_norm)).abs().max() < 1e-2


def test_fusion_all_image_tokens_padded_is_finite():
    m = _fusion()
    image, category, _ = _fusion_inputs()
    all_pad = torch.ones(2, 7, dtype=torch.bool)
    img, cat = m(image, category, all_pad)
    assert torch.isfinite(img).all() and torch.isfinite(cat).all()
    # nothing to read: category tokens are their normed input
    torch.testing.assert_close(cat, _ln(category, m.category_norm))


def test_fusion_gradients_and_bad_masks():
    m = _fusion(drop_path=0.1, dropout=0.1).train()
    image, category, pad = _fusion_inputs()
    image.requires_grad_(True)
    category.requires_grad_(True)
    img, cat = m(image, category, pad)
    (img.square().sum() + cat.square().sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert image.grad is not None and category.grad is not None
    with pytest.raises(ValueError, match="image_padding_mask"):
        m(image, category, pad.float())
    with pytest.raises(ValueError, match="image_padding_mask"):
        m(image, category, pad[:, :3])


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
    out = blk(q, cat, pos)
    # explicit reference: residual on the content query, attention query = content + pos
    a = blk.attn
    ref = []
    for b in range(2):
        qh = _lin(q[b] + pos[b], a.q_proj).view(6, 4, 4)
        kh = _lin(cat[b], a.k_proj).view(-1, 4, 4)
        vh = _lin(cat[b], a.v_proj).view(-1, 4, 4)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", qh, kh) / 2.0, -1)
        o = torch.einsum("hqk,khd->qhd", att, vh).reshape(6, 16)
        ref.append(_ln(q[b] + _lin(o, a.out_proj), blk.norm))
    torch.testing.assert_close(out, torch.stack(ref))


def test_masked_softmax_rows():
    x = torch.randn(2, 3, dtype=torch.float64)
    keep = torch.tensor([[True, False, True], [False, False, False]])
    p = masked_softmax(x, keep)
    torch.testing.assert_close(p[0, [0, 2]], torch.softmax(x[0, [0, 2]], 0))
    assert p[0, 1] == 0 and torch.all(p[1] == 0)

"""Shapes, masks and padding behaviour of the DINO building blocks."""

import math

import pytest
import torch
from torch import nn

from cqdino.modeling import (
    CDNGenerator,
    ChannelMapper,
    ClassHeadState,
    DeformableDecoder,
    DeformableEncoder,
    DINOTransformer,
    LinearClassHead,
    MaskedGroupNorm,
    PositionEmbeddingSine,
    TimmSwinBackbone,
    build_resnet,
    level_masks,
    sine_embed_boxes,
)
from cqdino.modeling.dino.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid


def test_resnet18_outputs_c3_c5():
    r = build_resnet(18, norm="BN", freeze_at=0)
    out = r(torch.randn(1, 3, 70, 100))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res3": (1, 128, 9, 13),
        "res4": (1, 256, 5, 7),
        "res5": (1, 512, 3, 4),
    }
    assert all(p.requires_grad for p in r.parameters())
    frozen = build_resnet(18, norm="FrozenBN", freeze_at=1)
    assert not any(p.requires_grad for p in frozen.stem.parameters())
    with pytest.raises(ValueError, match="depth"):
        build_resnet(19)


@pytest.mark.slow
def test_swin_tiny_dynamic_size_nchw():
    m = TimmSwinBackbone("swin_t", drop_path_rate=0.0).eval()
    out = m(torch.randn(1, 3, 70, 100))  # padded to 96 x 128 internally
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res3": (1, 192, 12, 16),
        "res4": (1, 384, 6, 8),
        "res5": (1, 768, 3, 4),
    }
    assert {k: (s.channels, s.stride) for k, s in m.output_shape().items()} == {
        "res3": (192, 8),
        "res4": (384, 16),
        "res5": (768, 32),
    }


def test_level_masks_ceil():
    m = level_masks([(70, 100), (64, 64)], (3, 4), 32, "cpu")
    assert (~m[0]).sum().item() == 3 * 4 and (~m[1]).sum().item() == 2 * 2
    assert m[1, 2].all() and m[1, :, 2:].all()


def test_masked_group_norm_equals_group_norm_on_the_crop(rng_seed):
    gn = MaskedGroupNorm(4, 8)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = torch.randn(1, 8, 6, 9)
    ref = nn.functional.group_norm(
        x[..., :4, :5].double(), 4, gn.weight.double(), gn.bias.double(), gn.eps
    )
    mask = torch.ones(1, 6, 9, dtype=torch.bool)
    mask[:, :4, :5] = False
    garbage = torch.where(mask[:, None], torch.randn_like(x) * 5 + 3, x)  # valid part is x
    out = gn(garbage, mask)
    torch.testing.assert_close(out[..., :4, :5].double(), ref, atol=1e-5, rtol=1e-5)


def test_channel_mapper_shapes_and_masks():
    r = build_resnet(18)
    neck = ChannelMapper(r.output_shape(), ["res3", "res4", "res5"], 64, 1, 32)
    feats = r(torch.randn(2, 3, 96, 128))
    maps, masks = neck(feats, [(96, 128), (70, 100)])
    assert [tuple(m.shape) for m in maps] == [
        (2, 64, 12, 16),
        (2, 64, 6, 8),
        (2, 64, 3, 4),
        (2, 64, 2, 2),
    ]
    assert [tuple(m.shape) for m in masks] == [(2, 12, 16), (2, 6, 8), (2, 3, 4), (2, 2, 2)]
    assert not masks[0][0].any()
    assert [(~m[1]).sum().item() for m in masks] == [9 * 13, 5 * 7, 3 * 4, 2 * 2]
    assert neck.strides == [8, 16, 32, 64]


def test_position_embedding_ignores_padding():
    pe = PositionEmbeddingSine(16)
    small = torch.zeros(1, 5, 7, dtype=torch.bool)
    big = torch.ones(1, 9, 11, dtype=torch.bool)
    big[:, :5, :7] = False
    a, b = pe(small), pe(big)
    assert a.shape == (1, 32, 5, 7) and b.shape == (1, 32, 9, 11)
    torch.testing.assert_close(a, b[..., :5, :7])
    # normalised coordinates: the last valid pixel centre maps to (n - 0.5) / n * 2 pi
    y = (5 - 0.5) / 5 * 2 * math.pi
    assert a[0, 0, 4, 0].item() == pytest.approx(math.sin(y), abs=1e-5)


def test_sine_embed_boxes_shape_and_order():
    e = sine_embed_boxes(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), 8)
    assert e.shape == (1, 32)
    # first block encodes y (0.2): sin(0.2 * 2 pi / 1)
    assert e[0, 0].item() == pytest.approx(math.sin(0.2 * 2 * math.pi), abs=1e-6)


def test_cdn_generator(rng_seed):
    gen = CDNGenerator(
        num_labels=6,
        num_noise_labels=5,
        embed_dim=16,
        dn_number=12,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
    )
    boxes = [
        torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.3, 0.1, 0.1]]),
        torch.tensor([[0.6, 0.4, 0.3, 0.3]]),
    ]
    labels = [torch.tensor([1, 5]), torch.tensor([2])]
    content, ref, mask, meta = gen(labels, boxes, num_queries=7)
    groups, max_g = 12 // 2, 2
    num_dn = groups * 2 * max_g
    assert meta["num_groups"] == groups and meta["num_dn"] == num_dn
    assert content.shape == (2, num_dn, 16) and ref.shape == (2, num_dn, 4)
    assert mask.shape == (num_dn + 7, num_dn + 7) and mask.dtype == torch.bool
    # matching queries see each other but no DN query; DN queries see the matching ones
    assert mask[num_dn:, :num_dn].all() and not mask[num_dn:, num_dn:].any()
    assert not mask[:num_dn, num_dn:].any()
    for k in range(groups):
        s, e = 4 * k, 4 * (k + 1)
        assert not mask[s:e, s:e].any()
        assert mask[s:e, :s].all() and mask[s:e, e:num_dn].all()
    # positives stay within half a box size of the GT corners, negatives between 1 and 2
    q, t = meta["indices"][0]
    assert q.tolist() == [4 * k + j for k in range(groups) for j in range(2)]
    for b in range(2):
        gt = boxes[b]
        for k in range(groups):
            for j in range(len(gt)):
                half = torch.cat([gt[j, 2:], gt[j, 2:]]) / 2
                corners = box_cxcywh_to_xyxy(gt[j])
                pos = box_cxcywh_to_xyxy(ref[b, 4 * k + j].sigmoid())
                neg = box_cxcywh_to_xyxy(ref[b, 4 * k + j + 2].sigmoid())
                dp = (pos - corners).abs() / half
                dn = (neg - corners).abs() / half
                assert (dp <= 1 + 1e-3).all()
                # a negative whose corners crossed collapses to zero extent on that axis
                # (inverse_sigmoid clamps the size to [0, 1], as in DINO): check the others
                extent = ref[b, 4 * k + j + 2].sigmoid()[2:].repeat(2)
                ok = extent < 1e-4
                clamped = (neg <= 1e-4) | (neg >= 1 - 1e-4)
                assert ((dn >= 1 - 1e-3) | clamped | ok).all() and ((dn <= 2 + 1e-3) | ok).all()
    # padded slots of image 1 (one GT) hold zeros
    assert (content[1, 1] == 0).all() and (content[1, 3] == 0).all()
    # no GT in the whole batch: no DN
    assert gen([torch.zeros(0, dtype=torch.long)], [torch.zeros(0, 4)], 7) == (None,) * 4


def test_cdn_label_noise_rate():
    torch.manual_seed(0)
    gen = CDNGenerator(
        num_labels=1000, num_noise_labels=1000, embed_dim=4, dn_number=1000, label_noise_ratio=0.5
    )
    table = gen.label_embed.weight
    content, _, _, meta = gen(
        [torch.zeros(1, dtype=torch.long)], [torch.tensor([[0.5, 0.5, 0.2, 0.2]])], 1
    )
    kept = (content[0] == table[0]).all(-1).float().mean().item()
    assert kept == pytest.approx(0.75, abs=0.05)  # flipped with prob 0.25 (to label 0 w.p. 1e-3)


def _tiny_transformer(num_queries=20, d=64, layers=2):
    torch.manual_seed(0)
    return DINOTransformer(
        DeformableEncoder(layers, d, 4, 128, 4, 2),
        DeformableDecoder(layers, d, 4, 128, 4, 2),
        num_levels=4,
        num_queries=num_queries,
        embed_dim=d,
    ).eval()


def test_transformer_shapes_and_enc_outputs():
    t = _tiny_transformer()
    head = LinearClassHead(7, 64, 2)
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    feats = [torch.randn(2, 64, h, w) for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    pos = [PositionEmbeddingSine(32)(m) for m in masks]
    hidden, boxes, enc, state = t(feats, masks, pos, head, ClassHeadState())
    assert hidden.shape == (2, 2, 20, 64) and boxes.shape == (2, 2, 20, 4)
    assert enc["pred_logits"].shape == (2, 20, 7) and enc["pred_boxes"].shape == (2, 20, 4)
    assert ((boxes >= 0) & (boxes <= 1)).all()


def test_transformer_padding_is_exact(rng_seed):
    """Identical features with and without padding give identical outputs (valid region),
    with garbage in the padding and another image in the batch."""
    t = _tiny_transformer()
    head = LinearClassHead(7, 64, 2).eval()
    pe = PositionEmbeddingSine(32)
    valid = [(7, 9), (4, 5), (2, 3), (1, 2)]  # ceil(h / 2^l) of a 7 x 9 level-0 map
    padded = [(10, 12), (5, 6), (3, 3), (2, 2)]
    feats = [torch.randn(1, 64, h, w) for h, w in valid]
    alone_masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in valid]
    with torch.no_grad():
        ref = t(feats, alone_masks, [pe(m) for m in alone_masks], head, ClassHeadState())

        big, masks = [], []
        for f, (h, w), (H, W) in zip(feats, valid, padded):
            x = torch.randn(2, 64, H, W) * 10  # garbage + another image
            x[0, :, :h, :w] = f[0]
            m = torch.zeros(2, H, W, dtype=torch.bool)
            m[0] = True
            m[0, :h, :w] = False
            big.append(x)
            masks.append(m)
        out = t(big, masks, [pe(m) for m in masks], head, ClassHeadState())
    torch.testing.assert_close(out[0][:, :1], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1][:, :1], ref[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        out[2]["pred_logits"][:1], ref[2]["pred_logits"], atol=1e-4, rtol=1e-4
    )


def test_box_ops_inverse_sigmoid_finite():
    x = torch.tensor([0.0, 0.5, 1.0])
    y = inverse_sigmoid(x)
    assert torch.isfinite(y).all() and y[1] == 0


def test_map_dn_labels_rejects_unmapped_targets_without_a_dn_row():
    head = LinearClassHead(7, 64, 2)  # no "not selected" row
    labels = torch.tensor([3, 0, 6])
    assert torch.equal(head.map_dn_labels(labels), labels)
    with pytest.raises(RuntimeError, match="no unselected_dn_label row"):
        head.map_dn_labels(torch.tensor([3, -1]))
    head.unselected_dn_label = 7  # a head with the extra row maps -1 to it
    assert head.map_dn_labels(torch.tensor([3, -1])).tolist() == [3, 7]


def test_decoder_shared_box_head():
    from cqdino.modeling import DeformableDecoder

    per_layer = DeformableDecoder(num_layers=3, embed_dim=16, num_heads=2, ffn_dim=32)
    shared = DeformableDecoder(
        num_layers=3, embed_dim=16, num_heads=2, ffn_dim=32, share_box_head=True
    )
    assert len({id(m) for m in per_layer.bbox_embed}) == 3
    assert len({id(m) for m in shared.bbox_embed}) == 1
    mlp = sum(p.numel() for p in shared.bbox_embed[0].parameters())
    n_per, n_shared = (sum(p.numel() for p in d.parameters()) for d in (per_layer, shared))
    assert n_per - n_shared == 2 * mlp


def test_channels_last_resnet_computes_the_same_features():
    from cqdino.modeling import build_resnet

    torch.manual_seed(0)
    ref = build_resnet(depth=18, width=16, out_features=["res4", "res5"]).eval()
    nhwc = build_resnet(depth=18, width=16, out_features=["res4", "res5"], channels_last=True)
    nhwc.load_state_dict(ref.state_dict())
    nhwc.eval()
    assert nhwc.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 96)
    a, b = ref(x), nhwc(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)

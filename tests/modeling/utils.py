"""Small DINO builders and synthetic inputs shared by the modeling tests."""

from typing import Callable, Dict, List, Optional

import torch
from detectron2.structures import Boxes, Instances

from cqdino.modeling import (
    DINO,
    ChannelMapper,
    ClassHead,
    DeformableDecoder,
    DeformableEncoder,
    DINOTransformer,
    HungarianMatcher,
    LinearClassHead,
    PositionEmbeddingSine,
    SetCriterion,
    build_resnet,
)


def tiny_dino(
    num_classes: int = 10,
    num_queries: int = 50,
    layers: int = 2,
    embed_dim: int = 256,
    ffn_dim: int = 512,
    dn_number: int = 20,
    class_head: Optional[ClassHead] = None,
    use_checkpoint: bool = False,
    depth: int = 18,
    num_points: int = 4,
    width: int = 64,
    word_head: Optional[torch.nn.Module] = None,
) -> DINO:
    """R18 backbone (from-scratch preset), ``layers`` + ``layers`` transformer, 4 levels."""
    backbone = build_resnet(depth, norm="BN", freeze_at=0, width=width)
    return DINO(
        backbone=backbone,
        neck=ChannelMapper(backbone.output_shape(), ["res3", "res4", "res5"], embed_dim, 1, 32),
        position_embedding=PositionEmbeddingSine(embed_dim // 2),
        transformer=DINOTransformer(
            DeformableEncoder(
                layers, embed_dim, 8, ffn_dim, 4, num_points, 0.0, use_checkpoint=use_checkpoint
            ),
            DeformableDecoder(layers, embed_dim, 8, ffn_dim, 4, num_points, 0.0),
            num_levels=4,
            num_queries=num_queries,
            embed_dim=embed_dim,
        ),
        class_head=class_head or LinearClassHead(num_classes, embed_dim, layers),
        criterion=SetCriterion(HungarianMatcher()),
        pixel_mean=(103.53, 116.28, 123.675),
        pixel_std=(57.375, 57.120, 58.395),
        dn_number=dn_number,
        word_head=word_head,
    )


def random_input(h: int, w: int, num_boxes: int, num_classes: int, gen=None) -> Dict:
    """One detectron2 input dict with a random image and ``num_boxes`` random boxes."""
    inst = Instances((h, w))
    xy = torch.rand(num_boxes, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
    wh = (torch.rand(num_boxes, 2, generator=gen) * 0.3 + 0.05) * torch.tensor([w, h])
    inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
    inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=gen)
    return {"image": torch.rand(3, h, w, generator=gen) * 255, "instances": inst}


def batch(specs: List[tuple], num_classes: int, seed: int = 0) -> List[Dict]:
    gen = torch.Generator().manual_seed(seed)
    return [random_input(h, w, n, num_classes, gen) for h, w, n in specs]


def assert_checkpointing_is_exact(build: Callable[[bool], torch.nn.Module], inputs: List[Dict]):
    """One training step with and without activation checkpointing (``build(use_checkpoint)``,
    same seeds) gives the same losses and gradients."""
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build(ckpt)
        torch.manual_seed(1)
        losses = model(inputs)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    for k in l0:
        torch.testing.assert_close(l0[k], l1[k])
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-5, rtol=1e-4, msg=n)

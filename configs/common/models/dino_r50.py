"""DINO-4scale R50 (6 + 6 layers, 900 queries, 100 DN queries), from-scratch backbone preset.

With ImageNet weights (``train.init_checkpoint``) switch to the pretrained preset::

    model.backbone.norm = "FrozenBN"; model.backbone.freeze_at = 1
    # and backbone lr x 0.01:
    optimizer.params = L(get_dino_optimizer_params)(base_lr=..., backbone_lr_multiplier=0.01)
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from cqdino.modeling import (
    DINO,
    ChannelMapper,
    DeformableDecoder,
    DeformableEncoder,
    DINOTransformer,
    HungarianMatcher,
    LinearClassHead,
    PositionEmbeddingSine,
    SetCriterion,
    build_resnet,
)

model = L(DINO)(
    backbone=L(build_resnet)(
        depth=50, norm="BN", freeze_at=0, out_features=["res3", "res4", "res5"]
    ),
    neck=L(ChannelMapper)(
        # R50 C3-C5: channels 512/1024/2048 at strides 8/16/32
        input_shapes={
            "res3": L(ShapeSpec)(channels=512, stride=8),
            "res4": L(ShapeSpec)(channels=1024, stride=16),
            "res5": L(ShapeSpec)(channels=2048, stride=32),
        },
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        num_extra_levels=1,  # 3 backbone levels + 1 = transformer.num_levels
        num_groups=32,
    ),
    position_embedding=L(PositionEmbeddingSine)(num_pos_feats=128, offset=-0.5),
    transformer=L(DINOTransformer)(
        encoder=L(DeformableEncoder)(
            num_layers=6,
            embed_dim=256,
            num_heads=8,
            ffn_dim=2048,
            num_levels=4,
            num_points=4,
            dropout=0.0,
            use_checkpoint=False,
        ),
        decoder=L(DeformableDecoder)(
            num_layers=6,
            embed_dim=256,
            num_heads=8,
            ffn_dim=2048,
            num_levels=4,
            num_points=4,
            dropout=0.0,
        ),
        num_levels=4,
        num_queries=900,
        embed_dim=256,
    ),
    class_head=L(LinearClassHead)(
        num_classes=80,
        embed_dim=256,
        num_decoder_layers="${..transformer.decoder.num_layers}",
    ),
    criterion=L(SetCriterion)(
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        loss_class_weight=1.0,
        loss_bbox_weight=5.0,
        loss_giou_weight=2.0,
    ),
    input_format="BGR",  # the mappers read it (dataloader.*.mapper.image_format)
    pixel_mean=[103.530, 116.280, 123.675],  # BGR, detectron2's DatasetMapper default
    pixel_std=[57.375, 57.120, 58.395],
    dn_number=100,
    label_noise_ratio=0.5,
    box_noise_scale=1.0,
    select_box_nums_for_evaluation=300,
)

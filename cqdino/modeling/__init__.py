"""DINO core (detectron2 meta-architecture ``"DINO"``) and its swappable parts."""

from .backbone import (
    BACKBONE_PRESETS,
    TimmSwinBackbone,
    build_resnet,
    build_timm_swin_backbone,
    get_dino_optimizer_params,
)
from .criterion import SetCriterion, sigmoid_focal_loss
from .denoising import CDNGenerator
from .heads import ClassHead, ClassHeadState, LinearClassHead
from .matcher import HungarianMatcher
from .meta_arch import DINO
from .neck import ChannelMapper, MaskedGroupNorm
from .position_encoding import PositionEmbeddingSine, sine_embed_boxes
from .transformer import DeformableDecoder, DeformableEncoder, DINOTransformer

__all__ = [
    "BACKBONE_PRESETS",
    "get_dino_optimizer_params",
    "TimmSwinBackbone",
    "build_resnet",
    "build_timm_swin_backbone",
    "SetCriterion",
    "sigmoid_focal_loss",
    "CDNGenerator",
    "ClassHead",
    "ClassHeadState",
    "LinearClassHead",
    "HungarianMatcher",
    "DINO",
    "ChannelMapper",
    "MaskedGroupNorm",
    "PositionEmbeddingSine",
    "sine_embed_boxes",
    "DeformableDecoder",
    "DeformableEncoder",
    "DINOTransformer",
]

# CQ-DINO (registers the "CQDINO" meta-architecture)
from .contrastive_head import (  # noqa: E402
    ContrastiveClassHead,
    build_contrastive_class_head,
    load_category_tree,
)
from .meta_arch_cqdino import (  # noqa: E402
    CQDINO,
    DecoderCategoryAttention,
    EncoderCategoryFusion,
    cqdino_recipe_multipliers,
    decoder_category_attention,
    encoder_fusion_layers,
    install_category_hooks,
)

__all__ += [
    "ContrastiveClassHead",
    "build_contrastive_class_head",
    "load_category_tree",
    "CQDINO",
    "DecoderCategoryAttention",
    "EncoderCategoryFusion",
    "cqdino_recipe_multipliers",
    "decoder_category_attention",
    "encoder_fusion_layers",
    "install_category_hooks",
]

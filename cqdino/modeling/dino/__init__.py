"""DINO core: the detectron2 meta-architecture ``"DINO"`` and its swappable parts (backbone,
neck, transformer with two hook points, class-head interface, denoising, matcher, criterion)."""

from .backbone import (
    BACKBONE_PRESETS,
    ConvPaddingZeroer,
    TimmSwinBackbone,
    build_resnet,
    build_timm_swin_backbone,
)
from .criterion import SetCriterion, sigmoid_focal_loss
from .denoising import CDNGenerator
from .heads import ClassHead, ClassHeadState, LinearClassHead
from .matcher import HungarianMatcher
from .meta_arch import DINO
from .neck import ChannelMapper, MaskedGroupNorm, level_masks
from .param_groups import get_dino_optimizer_params, get_optimizer_params
from .position_encoding import PositionEmbeddingSine, sine_embed_boxes
from .transformer import DeformableDecoder, DeformableEncoder, DINOTransformer
from .word_head import NameWordHead

__all__ = [
    "BACKBONE_PRESETS",
    "ConvPaddingZeroer",
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
    "level_masks",
    "get_dino_optimizer_params",
    "get_optimizer_params",
    "PositionEmbeddingSine",
    "sine_embed_boxes",
    "DeformableDecoder",
    "DeformableEncoder",
    "DINOTransformer",
    "NameWordHead",
]

"""Layers and ops of cqdino; importable without detectron2."""

from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    ms_deform_attn,
    ms_deform_attn_reference,
)

__all__ = [
    "MultiScaleDeformableAttention",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
from .topk_gather import (  # noqa: E402
    contrastive_logits,
    contrastive_logits_reference,
    topk_category_gather,
    topk_category_gather_reference,
)

__all__ += [
    "contrastive_logits",
    "contrastive_logits_reference",
    "topk_category_gather",
    "topk_category_gather_reference",
]

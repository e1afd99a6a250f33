"""Layers and ops of cqdino; importable without detectron2."""

from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    ms_deform_attn,
    ms_deform_attn_flops,
    ms_deform_attn_reference,
)

__all__ = [
    "MultiScaleDeformableAttention",
    "ms_deform_attn",
    "ms_deform_attn_flops",
    "ms_deform_attn_reference",
]
from .contrastive_logits import contrastive_logits, contrastive_logits_reference  # noqa: E402
from .topk_gather import topk_category_gather, topk_category_gather_reference  # noqa: E402

__all__ += [
    "contrastive_logits",
    "contrastive_logits_reference",
    "topk_category_gather",
    "topk_category_gather_reference",
]

"""CQ-DINO on top of the DINO core: category queries (tree aggregation / self-attention), the
image-guided category selector and its loss, the contrastive class head, the encoder/decoder
category hooks, stage-1 helpers, and the detectron2 meta-architecture ``"CQDINO"``."""

from .category_queries import (
    BagOfWordsEncoder,
    CategoryQueries,
    CategorySelfAttention,
    load_category_embeddings,
    name_words,
)
from .contrastive_head import ContrastiveClassHead, build_contrastive_class_head, load_category_tree
from .fusion import CategoryCrossAttention, ImageCategoryFusion, MultiheadCrossAttention
from .hooks import (
    DecoderCategoryAttention,
    EncoderCategoryFusion,
    decoder_category_attention,
    encoder_fusion_layers,
    install_category_hooks,
)
from .meta_arch import CQDINO
from .param_groups import (
    category_module_names,
    cqdino_recipe_multipliers,
    freeze_for_stage1,
    frozen_modules,
    recipe_multipliers,
    stage1_trainable,
)
from .selection_loss import SelectionLoss, asymmetric_loss, image_level_targets
from .selector import CategorySelector, SelectorOutput
from .tree_aggregation import TreeAggregation

__all__ = [
    "BagOfWordsEncoder",
    "name_words",
    "CategoryQueries",
    "CategorySelfAttention",
    "load_category_embeddings",
    "ContrastiveClassHead",
    "build_contrastive_class_head",
    "load_category_tree",
    "CategoryCrossAttention",
    "ImageCategoryFusion",
    "MultiheadCrossAttention",
    "DecoderCategoryAttention",
    "EncoderCategoryFusion",
    "decoder_category_attention",
    "encoder_fusion_layers",
    "install_category_hooks",
    "CQDINO",
    "category_module_names",
    "cqdino_recipe_multipliers",
    "freeze_for_stage1",
    "frozen_modules",
    "recipe_multipliers",
    "stage1_trainable",
    "SelectionLoss",
    "asymmetric_loss",
    "image_level_targets",
    "CategorySelector",
    "SelectorOutput",
    "TreeAggregation",
]

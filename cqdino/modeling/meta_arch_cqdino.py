"""CQ-DINO as a detectron2 meta-architecture: DINO with the contrastive category head, the
encoder image<->category fusion and the decoder category cross-attention.

What differs from :class:`~cqdino.modeling.meta_arch.DINO` (everything else is inherited):

* the class head is a :class:`~cqdino.modeling.contrastive_head.ContrastiveClassHead` (category
  selection in ``prepare``, contrastive logits, targets by prompt position, DN table of K + 1
  rows, inference maps columns back through the selected indices);
* the transformer's hook points are filled: an :class:`EncoderCategoryFusion` before each
  encoder layer and a :class:`DecoderCategoryAttention` in each decoder layer;
* ``stage1=True`` trains only the category queries + selector with the selection loss (the
  encoder and decoder are not run in training).
"""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from .contrastive_head import ContrastiveClassHead, build_contrastive_class_head
from .fusion import CategoryCrossAttention, ImageCategoryFusion
from .heads import ClassHeadState
from .meta_arch import DINO
from .param_groups import freeze_for_stage1, recipe_multipliers
from .transformer import DINOTransformer

__all__ = [
    "CQDINO",
    "EncoderCategoryFusion",
    "DecoderCategoryAttention",
    "encoder_fusion_layers",
    "decoder_category_attention",
    "install_category_hooks",
    "cqdino_recipe_multipliers",
]


class EncoderCategoryFusion(nn.Module):
    """Encoder hook: :class:`~cqdino.modeling.fusion.ImageCategoryFusion` between the image
    memory and the state's category tokens; returns the new memory and a state holding the
    updated tokens (read by the following layers, the decoder and the head)."""

    def __init__(
        self,
        embed_dim: int = 256,
        fusion_dim: int = 1024,
        num_heads: int = 4,
        init_values: float = 1e-4,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.fusion = ImageCategoryFusion(
            embed_dim, embed_dim, fusion_dim, num_heads, dropout, drop_path, init_values
        )

    def forward(
        self, memory: Tensor, memory_pos: Tensor, padding_mask: Tensor, state: ClassHeadState
    ) -> Tuple[Tensor, ClassHeadState]:
        """``memory [B, S, D]`` (positions unused, as in the authors' fusion), ``padding_mask
        [B, S]`` True = pad, ``state.embeddings [B, K, D]``."""
        memory, tokens = self.fusion(memory, state.embeddings, padding_mask, state.valid)
        return memory, dataclasses.replace(state, embeddings=tokens)


class DecoderCategoryAttention(nn.Module):
    """Decoder hook: object queries (+ their positional embedding) attend to the state's
    category tokens; residual + LayerNorm (:class:`~cqdino.modeling.fusion.CategoryCrossAttention`).
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = CategoryCrossAttention(embed_dim, num_heads, dropout)

    def forward(self, query: Tensor, query_pos: Tensor, state: ClassHeadState) -> Tensor:
        """``query``/``query_pos`` ``[B, N, D]`` -> ``[B, N, D]``."""
        return self.attn(query, state.embeddings, state.valid, query_pos)


def encoder_fusion_layers(
    num_layers: int = 6,
    embed_dim: int = 256,
    fusion_dim: int = 1024,
    num_heads: int = 4,
    init_values: float = 1e-4,
    drop_path: float = 0.0,
) -> List[EncoderCategoryFusion]:
    """One fusion hook per encoder layer (for ``DeformableEncoder(fusion_layers=...)``)."""
    return [
        EncoderCategoryFusion(embed_dim, fusion_dim, num_heads, init_values, drop_path)
        for _ in range(num_layers)
    ]


def decoder_category_attention(
    num_layers: int = 6, embed_dim: int = 256, num_heads: int = 8, dropout: float = 0.0
) -> List[DecoderCategoryAttention]:
    """One category cross-attention per decoder layer (``DeformableDecoder(category_attn=...)``)."""
    return [DecoderCategoryAttention(embed_dim, num_heads, dropout) for _ in range(num_layers)]


def install_category_hooks(
    transformer: DINOTransformer,
    fusion_layers: Sequence[nn.Module],
    category_attn: Sequence[nn.Module],
) -> DINOTransformer:
    """Fill the hook points of an already built DINO transformer (used by the yacs path, which
    builds the transformer through DINO's ``from_config``). Returns the transformer."""
    enc, dec = transformer.encoder, transformer.decoder
    if len(fusion_layers) != len(enc.layers) or len(category_attn) != dec.num_layers:
        raise ValueError(
            f"{len(fusion_layers)} fusion hooks / {len(category_attn)} category-attention hooks "
            f"for {len(enc.layers)} encoder / {dec.num_layers} decoder layers"
        )
    enc.fusion_layers = nn.ModuleList(fusion_layers)
    for layer, hook in zip(dec.layers, category_attn):
        layer.category_attn = hook
    return transformer


def cqdino_recipe_multipliers(pretrained: bool) -> Dict[str, Tuple[float, float]]:
    """``{module prefix: (lr mult, weight-decay mult)}`` of the recipe for
    :func:`~cqdino.modeling.param_groups.get_cqdino_optimizer_params`: with pretrained
    initialisation the backbone and the category queries (``class_head.category_queries``) at
    lr x 0.01 and weight decay x 10; from scratch all 1 (empty dict)."""
    return recipe_multipliers(
        pretrained, backbone="backbone", category_queries="class_head.category_queries"
    )


def _dataset_category_ids(cfg) -> Optional[List[int]]:
    """Dataset category ids in contiguous order from the first training dataset's metadata
    (``thing_dataset_id_to_contiguous_id``), so the tree's categories line up with the model's
    columns; None when the metadata does not say (the tree's sorted ids are used)."""
    if not cfg.DATASETS.TRAIN:
        return None
    from detectron2.data import MetadataCatalog

    mapping = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_dataset_id_to_contiguous_id")
    return sorted(mapping, key=mapping.get) if mapping else None


@META_ARCH_REGISTRY.register()
class CQDINO(DINO):
    """CQ-DINO (Sun et al., 2025): DINO whose classifier matches object queries against the
    per-image top-K of C learnable category queries (see module doc for what differs).

    Distributed training: as DINO, every parameter gets a gradient in every step (the selection
    loss reaches the selector's score layer, the tokens reach the queries and ``out_proj``); in
    stage 1 everything outside the category modules is frozen (``requires_grad=False``).
    """

    @configurable
    def __init__(self, *, stage1: bool = False, stage1_extra_trainable: Sequence[str] = (), **kw):
        """
        Args:
            stage1: selector pre-training: freeze everything except the category queries and
                the selector without its token projection ``out_proj`` (plus
                ``stage1_extra_trainable`` prefixes, e.g. ``["backbone"]`` from scratch) and
                return only ``loss_select`` in training. Inference runs the full detector.
            kw: the arguments of :class:`DINO`; ``class_head`` must be a
                :class:`ContrastiveClassHead` and the transformer's hooks are expected to be
                filled (:func:`encoder_fusion_layers`, :func:`decoder_category_attention`).
        """
        super().__init__(**kw)
        if not isinstance(self.class_head, ContrastiveClassHead):
            raise TypeError(
                f"CQDINO needs a ContrastiveClassHead, got {type(self.class_head).__name__}"
            )
        if self.transformer.embed_dim != self.class_head.embed_dim:
            raise ValueError(
                f"category tokens are {self.class_head.embed_dim} wide, the transformer "
                f"{self.transformer.embed_dim}"
            )
        self.stage1 = stage1
        if stage1:
            freeze_for_stage1(self, tuple(stage1_extra_trainable))
            # the selection loss does not reach the token projection: freeze it too, so every
            # trainable parameter gets a gradient (DDP without find_unused_parameters)
            self.class_head.selector.out_proj.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CQDINO
        d = cfg.MODEL.DINO
        # DINO's builder makes everything but the head and the hooks; keep it from allocating
        # a Linear(256, C) head per layer that is thrown away right after.
        base = cfg.clone()
        base.defrost()
        base.MODEL.DINO.NUM_CLASSES = 1
        ret = super().from_config(base)
        shapes = ret["backbone"].output_shape()
        if c.IN_FEATURE not in shapes:
            raise ValueError(
                f"MODEL.CQDINO.IN_FEATURE={c.IN_FEATURE!r} is not a backbone output "
                f"({sorted(shapes)}); add it to the backbone's OUT_FEATURES"
            )
        ret["class_head"] = build_contrastive_class_head(
            d.NUM_CLASSES,
            shapes[c.IN_FEATURE].channels,
            num_decoder_layers=d.DEC_LAYERS,
            embed_dim=d.HIDDEN_DIM,
            topk=c.TOPK,
            query_dim=c.QUERY_DIM,
            selector_memory_dim=c.SELECTOR_MEMORY_DIM,
            selector_num_heads=c.SELECTOR_NUM_HEADS,
            selector_ffn_dim=c.SELECTOR_FFN_DIM,
            selector_num_layers=c.SELECTOR_NUM_LAYERS,
            selector_chunk_size=c.SELECTOR_CHUNK_SIZE,
            selector_checkpoint=c.SELECTOR_CHECKPOINT,
            relation=c.RELATION,
            tree_file=c.TREE_FILE or None,
            category_ids=_dataset_category_ids(cfg),
            ancestor_masking=c.ANCESTOR_MASKING,
            init_embeddings=c.EMBEDDINGS_FILE or None,
            selection_loss=c.SELECTION_LOSS,
            force_gt=c.FORCE_GT,
            in_feature=c.IN_FEATURE,
            in_stride=shapes[c.IN_FEATURE].stride,
        )
        install_category_hooks(
            ret["transformer"],
            encoder_fusion_layers(
                d.ENC_LAYERS,
                d.HIDDEN_DIM,
                c.FUSION_DIM,
                c.FUSION_NUM_HEADS,
                c.FUSION_INIT_VALUES,
                c.FUSION_DROP_PATH,
            ),
            decoder_category_attention(d.DEC_LAYERS, d.HIDDEN_DIM, c.DECODER_CATEGORY_HEADS),
        )
        ret["stage1"] = c.STAGE1
        ret["stage1_extra_trainable"] = list(c.STAGE1_EXTRA_TRAINABLE)
        return ret

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """As :meth:`DINO.forward`; in training the loss dict also holds ``loss_select``. With
        ``stage1`` (training only) it is the only loss and the encoder/decoder are skipped."""
        if not (self.training and self.stage1):
            return super().forward(batched_inputs)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("CQDINO stage-1 training needs 'instances' in every input dict")
        images = self.preprocess_image(batched_inputs)
        targets = self.prepare_targets([x["instances"] for x in batched_inputs])
        if self._padding_zeroer is not None:
            self._padding_zeroer.set(images.image_sizes, tuple(images.tensor.shape[-2:]))
        # a frozen backbone needs no activations kept for backward
        grad = any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            features = self.backbone(images.tensor)
        state = self.prepare_class_state(features, images, targets)
        return dict(state.losses)

"""CQ-DINO as a detectron2 meta-architecture: DINO with the contrastive category head, the
encoder image<->category fusion and the decoder category cross-attention.

What differs from :class:`~cqdino.modeling.dino.meta_arch.DINO` (everything else is inherited):

* the class head is a :class:`~.contrastive_head.ContrastiveClassHead` (category selection in
  ``prepare``, contrastive logits, targets by prompt position, DN table of K + 1 rows,
  inference maps columns back through the selected indices);
* the transformer's hook points are filled (:mod:`.hooks`): an ``EncoderCategoryFusion`` before
  each encoder layer and a ``DecoderCategoryAttention`` in each decoder layer;
* ``stage1=True`` trains only the category queries + selector with the selection loss (the
  encoder and decoder are not run in training; frozen parts stay in eval mode).
"""

from typing import Dict, List, Optional, Sequence

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor

from ..dino.meta_arch import DINO
from .contrastive_head import ContrastiveClassHead, build_contrastive_class_head
from .hooks import decoder_category_attention, encoder_fusion_layers, install_category_hooks
from .param_groups import freeze_for_stage1, frozen_modules

__all__ = ["CQDINO"]


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
    stage 1 everything outside the category modules is frozen (``requires_grad=False``) and the
    frozen modules stay in eval mode through ``model.train()`` (BatchNorm statistics fixed).
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
        head, shapes = self.class_head, self.backbone.output_shape()
        if head.in_feature in shapes:
            want, got = head.selector.input_proj.in_features, shapes[head.in_feature].channels
            if want != got:
                raise ValueError(
                    f"model.class_head.in_channels={want} does not match the backbone: "
                    f"model.backbone outputs {head.in_feature} with channels={got}"
                )
        self.stage1 = stage1
        self._frozen: List[str] = []
        if stage1:
            freeze_for_stage1(self, tuple(stage1_extra_trainable))
            # the selection loss does not reach the token projection: freeze it too, so every
            # trainable parameter gets a gradient (DDP without find_unused_parameters)
            self.class_head.selector.out_proj.requires_grad_(False)
            if self.class_head.selector.query_proj is not None:
                self.class_head.selector.query_proj.requires_grad_(False)
            self._frozen = frozen_modules(self)
            self.train(self.training)

    def train(self, mode: bool = True) -> "CQDINO":
        """As ``nn.Module.train``; in stage 1 the frozen modules stay in eval mode."""
        super().train(mode)
        for name in self._frozen if mode else ():
            self.get_submodule(name).eval()
        return self

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

    def prepare_class_state(self, features, images, targets):
        """The head's ``prepare`` with the GT boxes too (its dense selection loss uses them)."""
        if targets is None:
            return self.class_head.prepare(features, images.image_sizes)
        return self.class_head.prepare(
            features,
            images.image_sizes,
            [t["classes"] for t in targets],
            gt_boxes=[t["boxes"] for t in targets],
        )

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """As :meth:`DINO.forward`; in training the loss dict also holds ``loss_select``. With
        ``stage1`` (training only) it is the only loss and the encoder/decoder are skipped."""
        if not (self.training and self.stage1):
            return super().forward(batched_inputs)
        _, _, _, state = self.extract_features(batched_inputs)
        return dict(state.losses)

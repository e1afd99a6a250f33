"""CQ-DINO-4scale R50 for V3Det (C = 13,204, top-K 100, tree aggregation, ASL selection loss):
the DINO-4scale R50 model (``dino_r50.py``) with the contrastive category head, the encoder
image<->category fusion and the decoder category cross-attention. From-scratch backbone preset.

Needs the V3Det category tree (``class_head.tree_file``, by default the one registered with
``v3det_train`` under ``$DETECTRON2_DATASETS/V3Det/annotations``; not shipped). COCO recipe
(``configs/coco.py``)::

    model.class_head.num_categories = 80
    model.class_head.topk = 30
    model.class_head.relation = "self_attn"
    model.class_head.tree_file = None
    model.class_head.selection_loss = "bce"   # summed BCE, weight 0.1

Stage 1 (selector pre-training)::

    model.stage1 = True   # (+ model.stage1_extra_trainable = ["backbone"] from scratch)

With pretrained weights, the backbone and the category queries train at lr x 0.01 and weight
decay x 10: ``multipliers=L(cqdino_recipe_multipliers)(pretrained=True)`` in
``configs/common/optim_cqdino.py``.
"""

from detectron2.config import LazyCall as L

from cqdino.data import category_tree_file
from cqdino.modeling import (
    CQDINO,
    build_contrastive_class_head,
    decoder_category_attention,
    encoder_fusion_layers,
)

from .dino_r50 import model

model._target_ = CQDINO
model.stage1 = False
model.stage1_extra_trainable = []

model.transformer.encoder.fusion_layers = L(encoder_fusion_layers)(
    num_layers="${..num_layers}",
    embed_dim="${..embed_dim}",
    fusion_dim=1024,  # bi-attention width, 4 heads, layer scale 1e-4
    num_heads=4,
    init_values=1e-4,
    drop_path=0.0,
)
model.transformer.decoder.category_attn = L(decoder_category_attention)(
    num_layers="${..num_layers}", embed_dim="${..embed_dim}", num_heads=8
)

model.class_head = L(build_contrastive_class_head)(
    num_categories=13204,
    in_channels="${..neck.input_shapes.res5.channels}",  # the selector reads the last stage
    num_decoder_layers="${..transformer.decoder.num_layers}",
    embed_dim="${..transformer.embed_dim}",
    topk=100,
    query_dim=768,
    selector_memory_dim=512,
    selector_num_heads=4,
    selector_ffn_dim=3072,
    selector_num_layers=2,
    selector_chunk_size=2048,
    selector_checkpoint=False,
    relation="tree",
    # the tree registered with the dataset ($DETECTRON2_DATASETS/V3Det/annotations/...)
    tree_file=L(category_tree_file)(dataset_name="v3det_train"),
    ancestor_masking=True,
    init_embeddings=None,  # optional [C, d] .pth/.npy (e.g. text embeddings of the names)
    selection_loss="asl",
    force_gt=False,
    in_feature="res5",
    in_stride=32,
)

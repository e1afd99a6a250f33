"""yacs configuration of cqdino (``cfg = get_cfg(); add_cqdino_config(cfg)``).

The yacs defaults here are the **COCO** recipe: ``MODEL.DINO.NUM_CLASSES = 80``, CQ-DINO with
``RELATION = "self_attn"``, ``TOPK = 30`` and the BCE selection loss (buildable offline, no tree
file). The LazyConfig CQ-DINO model config (``configs/common/models/cqdino_r50.py``) is the
**V3Det** recipe instead: 13,204 categories, tree aggregation (needs the category tree),
top-K 100, ASL selection loss. The two do not share defaults; set one from the other explicitly.
For V3Det under yacs set ``NUM_CLASSES: 13204``, ``TOPK: 100``, ``RELATION: "tree"``,
``SELECTION_LOSS: "asl"`` and ``TREE_FILE`` to ``cqdino.data.category_tree_file("v3det_train")``
(the path the dataset registration holds, under ``$DETECTRON2_DATASETS/V3Det/``).

Colour format: detectron2's ``INPUT.FORMAT`` ("BGR" by default) must match ``MODEL.PIXEL_MEAN``
(detectron2's default mean is the BGR ImageNet mean); ``cqdino.data.DetrDatasetMapper`` is BGR by
default as well.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_cqdino_config"]


def add_cqdino_config(cfg: CN) -> None:
    """Add the ``MODEL.DINO`` and ``MODEL.SWIN`` keys and switch the backbone to the
    from-scratch preset (no ImageNet weights offline): trainable BatchNorm, nothing frozen,
    C3-C5 outputs, ImageNet pixel std. With pretrained weights set ``MODEL.RESNETS.NORM:
    FrozenBN`` and ``MODEL.BACKBONE.FREEZE_AT: 1``. Then set
    ``MODEL.META_ARCHITECTURE: "DINO"``. The model's ``input_format`` (channel order of the
    images and of ``MODEL.PIXEL_MEAN``/``PIXEL_STD``) is detectron2's ``INPUT.FORMAT``.

    Defaults are COCO (80 classes; CQ-DINO: self-attention, K = 30), unlike the V3Det LazyConfig
    model configs (13,204 classes, tree); see the module docstring.
    """
    cfg.MODEL.DINO = CN()
    d = cfg.MODEL.DINO
    # COCO (the LazyConfig CQ-DINO model config: V3Det, 13,204)
    d.NUM_CLASSES = 80
    d.IN_FEATURES = ["res3", "res4", "res5"]
    d.NUM_FEATURE_LEVELS = 4  # inputs + stride-2 extra levels of the neck
    d.NECK_GN_GROUPS = 32
    d.HIDDEN_DIM = 256
    d.NHEADS = 8
    d.DIM_FEEDFORWARD = 2048
    d.DROPOUT = 0.0
    d.ENC_LAYERS = 6
    d.DEC_LAYERS = 6
    d.ENC_N_POINTS = 4
    d.DEC_N_POINTS = 4
    d.NUM_QUERIES = 900
    d.USE_CHECKPOINT = False  # activation checkpointing of encoder layers
    # Denoising
    d.DN_NUMBER = 100
    d.LABEL_NOISE_RATIO = 0.5
    d.BOX_NOISE_SCALE = 1.0
    # Matcher and losses
    d.COST_CLASS = 2.0
    d.COST_BBOX = 5.0
    d.COST_GIOU = 2.0
    d.CLASS_WEIGHT = 1.0
    d.BBOX_WEIGHT = 5.0
    d.GIOU_WEIGHT = 2.0
    d.FOCAL_ALPHA = 0.25
    d.FOCAL_GAMMA = 2.0
    # Inference
    d.NUM_SELECT = 300
    d.SIZE_DIVISIBILITY = 0
    # Optimiser: backbone lr multiplier (1.0 from scratch, 0.01 with pretrained weights)
    d.BACKBONE_LR_MULTIPLIER = 1.0

    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.VARIANT = "swin_t"
    cfg.MODEL.SWIN.OUT_INDICES = [1, 2, 3]
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2

    # From-scratch backbone preset (see cqdino.modeling.BACKBONE_PRESETS).
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]

    _add_cqdino_category_config(cfg)


def _add_cqdino_category_config(cfg: CN) -> None:
    """``MODEL.CQDINO``: the CQ-DINO parts (``MODEL.META_ARCHITECTURE: "CQDINO"``). The number of
    categories C is ``MODEL.DINO.NUM_CLASSES`` (one value for both heads); everything else of
    the detector is read from ``MODEL.DINO``. Defaults are the COCO recipe (C = 80), buildable
    offline; for V3Det set ``NUM_CLASSES: 13204``, ``TOPK: 100``, ``RELATION: "tree"``,
    ``TREE_FILE`` = ``cqdino.data.category_tree_file("v3det_train")``
    (``$DETECTRON2_DATASETS/V3Det/annotations/v3det_2023_v1_category_tree.json``),
    ``SELECTION_LOSS: "asl"`` -- the LazyConfig model config's (V3Det) values.
    """
    cfg.MODEL.CQDINO = CN()
    c = cfg.MODEL.CQDINO
    c.TOPK = 30  # K selected categories per image (V3Det 100, COCO 30); min(K, C) is used
    # Category queries
    c.QUERY_DIM = 768
    # COCO default; the LazyConfig model config uses "tree" (V3Det)
    c.RELATION = "self_attn"  # "tree" (V3Det, needs TREE_FILE) | "self_attn" (COCO) | "none"
    # V3Det: the registered path, cqdino.data.category_tree_file("v3det_train")
    c.TREE_FILE = ""  # category tree json in the V3Det layout
    c.ANCESTOR_MASKING = True  # ignore unlabelled ancestors in the selection loss (needs tree)
    c.EMBEDDINGS_FILE = ""  # optional [C, d] .pth/.npy initialisation (random otherwise)
    # Category selector (last backbone stage); CPU configs use narrow widths
    c.IN_FEATURE = "res5"
    c.SELECTOR_MEMORY_DIM = 512
    c.SELECTOR_NUM_HEADS = 4
    c.SELECTOR_FFN_DIM = 3072
    c.SELECTOR_NUM_LAYERS = 2
    c.SELECTOR_CHUNK_SIZE = 2048  # categories per chunk (bounds attention/FFN memory)
    c.SELECTOR_CHECKPOINT = False  # recompute chunk activations in backward
    c.SELECTION_LOSS = "bce"  # "asl" (V3Det, weight 1) | "bce" (COCO, weight 0.1)
    c.FORCE_GT = False  # force GT categories into the top-K in training
    # Encoder image<->category fusion and decoder category cross-attention
    c.FUSION_DIM = 1024
    c.FUSION_NUM_HEADS = 4
    c.FUSION_INIT_VALUES = 1e-4
    c.FUSION_DROP_PATH = 0.0
    c.DECODER_CATEGORY_HEADS = 8
    # Stage 1: train only the category queries + selector with the selection loss
    c.STAGE1 = False
    c.STAGE1_EXTRA_TRAINABLE = []  # e.g. ["backbone"] when training from scratch
    # Optimiser multipliers (pretrained recipe: backbone and class_head.category_queries at
    # lr x 0.01, weight decay x 10; from scratch 1): cqdino.modeling.cqdino_recipe_multipliers

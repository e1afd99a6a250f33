"""yacs configuration of cqdino (``cfg = get_cfg(); add_cqdino_config(cfg)``)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_cqdino_config"]


def add_cqdino_config(cfg: CN) -> None:
    """Add the ``MODEL.DINO`` and ``MODEL.SWIN`` keys and switch the backbone to the
    from-scratch preset (no ImageNet weights offline): trainable BatchNorm, nothing frozen,
    C3-C5 outputs, ImageNet pixel std. With pretrained weights set ``MODEL.RESNETS.NORM:
    FrozenBN`` and ``MODEL.BACKBONE.FREEZE_AT: 1``. Then set
    ``MODEL.META_ARCHITECTURE: "DINO"``. The model's ``input_format`` (channel order of the
    images and of ``MODEL.PIXEL_MEAN``/``PIXEL_STD``) is detectron2's ``INPUT.FORMAT``.
    """
    cfg.MODEL.DINO = CN()
    d = cfg.MODEL.DINO
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
    ``TREE_FILE: .../v3det_2023_v1_category_tree.json``, ``SELECTION_LOSS: "asl"``.
    """
    cfg.MODEL.CQDINO = CN()
    c = cfg.MODEL.CQDINO
    c.TOPK = 30  # K selected categories per image (V3Det 100, COCO 30); min(K, C) is used
    # Category queries
    c.QUERY_DIM = 768
    c.RELATION = "self_attn"  # "tree" (V3Det, needs TREE_FILE) | "self_attn" (COCO) | "none"
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

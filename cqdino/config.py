"""yacs configuration of cqdino (``cfg = get_cfg(); add_cqdino_config(cfg)``)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_cqdino_config"]


def add_cqdino_config(cfg: CN) -> None:
    """Add the ``MODEL.DINO`` and ``MODEL.SWIN`` keys and switch the backbone to the
    from-scratch preset (no ImageNet weights offline): trainable BatchNorm, nothing frozen,
    C3-C5 outputs, ImageNet pixel std. With pretrained weights set ``MODEL.RESNETS.NORM:
    FrozenBN`` and ``MODEL.BACKBONE.FREEZE_AT: 1``. Then set
    ``MODEL.META_ARCHITECTURE: "DINO"``.
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

    # From-scratch backbone preset (see cqdino.modeling.backbone.BACKBONE_PRESETS).
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]

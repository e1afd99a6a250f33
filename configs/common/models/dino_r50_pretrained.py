"""DINO R50 with the pretrained-backbone preset (the published recipe): FrozenBN, frozen stem.
Load ImageNet weights with ``train.init_checkpoint`` and scale the backbone lr by 0.01
(``optimizer.params.backbone_lr_multiplier = 0.01`` with ``configs/common/optim.py``)."""

from .dino_r50 import model

model.backbone.norm = "FrozenBN"
model.backbone.freeze_at = 1

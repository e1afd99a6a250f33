"""AdamW of the DINO recipe: lr 1e-4 at batch 16, weight decay 1e-4, no decay on norms;
``params.backbone_lr_multiplier`` is 1.0 from scratch and 0.01 with pretrained weights.
detectron2's ``lazyconfig_train_net`` sets ``optimizer.params.model``."""

import torch
from detectron2.config import LazyCall as L

from cqdino.modeling import get_dino_optimizer_params

AdamW = L(torch.optim.AdamW)(
    params=L(get_dino_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        backbone_lr_multiplier=1.0,
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

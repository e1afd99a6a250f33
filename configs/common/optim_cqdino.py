"""AdamW of the CQ-DINO recipe (lr 4e-4 at batch 16, weight decay 1e-4, no decay on norms)
with per-module multipliers. From scratch (default, offline) every multiplier is 1; with
pretrained backbone / category-query initialisation set ``pretrained=True``: the backbone and
``class_head.category_queries`` train at lr x 0.01 and weight decay x 10. The training script
sets ``optimizer.params.model = model`` before instantiating (as detectron2's
``lazyconfig_train_net.py`` does). Leaf configs: ``optimizer = <this file>.AdamW`` (the name
follows ``configs/common/optim.py``)."""

import torch
from detectron2.config import LazyCall as L

from cqdino.modeling import cqdino_recipe_multipliers, get_cqdino_optimizer_params

AdamW = L(torch.optim.AdamW)(
    params=L(get_cqdino_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        multipliers=L(cqdino_recipe_multipliers)(pretrained=False),
    ),
    lr=4e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

"""CQ-DINO Swin-L on V3Det: ``v3det.py`` (V3Det class head, data, 24-epoch recipe at batch 16)
with the timm Swin-L backbone (5 levels) of ``common/models/cqdino_swin_l.py``.

    python projects/train_net.py --config-file configs/v3det_swinl.py --num-gpus 8
"""

from .common.models.cqdino_swin_l import model
from .v3det import dataloader, lr_multiplier
from .v3det import model as _v3det_r50
from .v3det import optimizer, train

model.class_head = _v3det_r50.class_head  # V3Det head settings (tree from the dataset metadata)
train.output_dir = "./output/v3det_cqdino_swinl"

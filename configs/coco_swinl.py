"""CQ-DINO Swin-L on COCO: ``coco.py`` (COCO class head, data, 12-epoch recipe) with the timm
Swin-L backbone (5 levels) of ``common/models/cqdino_swin_l.py``.

    python projects/train_net.py --config-file configs/coco_swinl.py --num-gpus 8
"""

from .coco import dataloader, lr_multiplier
from .coco import model as _coco_r50
from .coco import optimizer, train
from .common.models.cqdino_swin_l import model

model.class_head = _coco_r50.class_head
train.output_dir = "./output/coco_cqdino_swinl"

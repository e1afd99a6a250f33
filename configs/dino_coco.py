"""The DINO baseline on COCO: DINO-4scale R50 (80 classes, linear head), the 12-epoch schedule
of ``coco.py`` at batch 16, AdamW lr 1e-4.

    python projects/train_net.py --config-file configs/dino_coco.py --num-gpus 8
"""

from .coco import lr_multiplier, train
from .common.data.coco import dataloader
from .common.models.dino_r50 import model
from .common.optim import AdamW as optimizer

model.class_head.num_classes = 80
optimizer.lr = 1e-4
train.output_dir = "./output/coco_dino_r50"

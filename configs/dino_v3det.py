"""The DINO baseline on V3Det: DINO-4scale R50 with a linear head over all 13,204 classes
(focal loss over C), class-aware repeat-factor sampling (threshold 1e-3, as the V3Det baselines),
the 24-epoch schedule of ``v3det.py`` at batch 16, AdamW lr 1e-4.

    python projects/train_net.py --config-file configs/dino_v3det.py --num-gpus 8
"""

from .common.data.v3det import dataloader
from .common.models.dino_r50 import model
from .common.optim import AdamW as optimizer
from .v3det import lr_multiplier, train

model.class_head.num_classes = 13204
dataloader.train.repeat_threshold = 1e-3
optimizer.lr = 1e-4
train.output_dir = "./output/v3det_dino_r50"

"""CQ-DINO R50 on COCO (80 categories): top-K 30, category self-attention instead of a tree,
summed BCE selection loss x 0.1, 12-epoch recipe at batch 16, AdamW lr 4e-4.

    python projects/train_net.py --config-file configs/coco.py --num-gpus 8
"""

from .common.data.coco import dataloader
from .common.models.cqdino_r50 import model
from .common.optim_cqdino import AdamW as optimizer
from .common.train import lr_multiplier, train

model.class_head.num_categories = 80
model.class_head.topk = 30
model.class_head.relation = "self_attn"
model.class_head.tree_file = None
model.class_head.ancestor_masking = False
model.class_head.selection_loss = "bce"  # summed BCE, weight 0.1

optimizer.lr = 4e-4

# 12 epochs x 117,266 images (train2017 with boxes) / 16 per batch = 87,950 iterations;
# lr x 0.1 at epoch 11 (11/12 of training)
train.epochs = 12
train.images_per_epoch = 117266
train.max_iter = 87950
lr_multiplier.milestones = (11 / 12,)
train.eval_period = 10000
train.checkpointer = dict(period=10000, max_to_keep=3)
train.output_dir = "./output/coco_cqdino_r50"

"""CQ-DINO R50 on V3Det (13,204 categories): top-K 100, tree aggregation over the dataset's
category tree, ASL selection loss with ancestor masking, no resampling, 24-epoch recipe at
batch 16 (8 GPUs x 2), AdamW lr 4e-4, grad clip 0.1.

    python projects/train_net.py --config-file configs/v3det.py --num-gpus 8

From scratch by default (no ImageNet weights offline). With your own backbone weights::

    train.init_checkpoint=/path/to/r50.pkl model.backbone.norm=FrozenBN model.backbone.freeze_at=1

and the pretrained lr multipliers (configs/common/optim_cqdino.py, ``pretrained=True``).
"""

from detectron2.config import LazyCall as L

from cqdino.data import category_tree_file

from .common.data.v3det import dataloader
from .common.models.cqdino_r50 import model
from .common.optim_cqdino import AdamW as optimizer
from .common.train import lr_multiplier, train

model.class_head.num_categories = 13204
model.class_head.topk = 100
model.class_head.relation = "tree"
model.class_head.tree_file = L(category_tree_file)(dataset_name="${dataloader.train.dataset.names}")
model.class_head.selection_loss = "asl"

optimizer.lr = 4e-4

# 24 epochs x 183,354 images / 16 per batch = 275,031 iterations; lr x 0.1 at epochs 12 and 18
train.epochs = 24
train.images_per_epoch = 183354
train.max_iter = 275031
train.eval_period = 50000
train.checkpointer = dict(period=10000, max_to_keep=3)
train.output_dir = "./output/v3det_cqdino_r50"

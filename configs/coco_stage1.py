"""Stage 1 of the two-stage COCO recipe: the category selector alone (category queries,
selector and, from scratch, the backbone) trained with the selection loss for 6 epochs; the
encoder and decoder are not run. Stage 2 (``coco.py``) starts from its weights.

    python projects/train_net.py --config-file configs/coco_stage1.py --num-gpus 8
    python projects/train_net.py --config-file configs/coco.py --num-gpus 8 \\
        train.init_checkpoint=output/coco_cqdino_r50_stage1/model_final.pth

The evaluation reports the selector's recall ARC@30 (and recall@15 / @60).
"""

from .coco import dataloader, lr_multiplier, model, optimizer, train

model.stage1 = True
model.stage1_extra_trainable = ["backbone"]  # from scratch: the selector's features too
optimizer.params.module_multipliers = {}  # the deformable offsets are not trained in stage 1

# 6 epochs x 117,266 images / 16 per batch = 43,975 iterations; lr x 0.1 at epoch 5
train.epochs = 6
train.max_iter = 43975
lr_multiplier.milestones = (5 / 6,)
train.output_dir = "./output/coco_cqdino_r50_stage1"

"""Stage 1 of the two-stage V3Det recipe: the category selector alone (category queries,
selector and, from scratch, the backbone) trained with the selection loss for 10 epochs; the
encoder and decoder are not run. Stage 2 (``v3det.py``) starts from its weights.

    python projects/train_net.py --config-file configs/v3det_stage1.py --num-gpus 8
    python projects/train_net.py --config-file configs/v3det.py --num-gpus 8 \\
        train.init_checkpoint=output/v3det_cqdino_r50_stage1/model_final.pth

The evaluation reports the selector's recall ARC@100 (and recall@50 / @200) beside the AP of
the (untrained) detector. With pretrained backbone weights, drop ``"backbone"`` from
``model.stage1_extra_trainable`` to train the selector on frozen features.
"""

from .v3det import dataloader, lr_multiplier, model, optimizer, train

model.stage1 = True
model.stage1_extra_trainable = ["backbone"]  # from scratch: the selector's features too
optimizer.params.module_multipliers = {}  # the deformable offsets are not trained in stage 1

# 10 epochs x 183,354 images / 16 per batch = 114,597 iterations; lr x 0.1 at epoch 8
train.epochs = 10
train.max_iter = 114597
lr_multiplier.milestones = (0.8,)
train.output_dir = "./output/v3det_cqdino_r50_stage1"

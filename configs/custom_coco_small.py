"""The demo-sized CQ-DINO (``demo.py``: R18 at quarter width, d = 128, 1 + 3 layers, 50
queries) on your own COCO-format dataset, small enough to train on a laptop CPU; config-only,
with the same overrides as ``custom_coco.py``:

    python projects/train_net.py --config-file configs/custom_coco_small.py \\
        dataloader.train.dataset.json_file=my_data/annotations/train.json \\
        dataloader.train.dataset.image_root=my_data/images \\
        dataloader.test.dataset.json_file=my_data/annotations/val.json \\
        dataloader.test.dataset.image_root=my_data/images \\
        train.max_iter=300 train.output_dir=output/my_data_small

What it keeps of the demo recipe needs nothing from the data but boxes and class ids: lr
1.2e-3, classification loss weight 5, gradient clip 1.0, one LR drop at 0.9 of the run,
sampling offsets at lr x 0.1, GT categories forced into the top-K in training, every category
a column at inference, NHWC convolutions and fused AdamW. What it changes: the name-word
levers are off (``demo.name_words``: they need many compositional category names), the
categories relate by self-attention (the COCO recipe; no category tree needed) with the COCO
selection loss (summed BCE x 0.1), the class count comes from the training json, images are
resized to a short side of 256-320 (test 320, long side <= 480) and evaluation is detectron2's
``COCOEvaluator`` on the val json (AP at 100 detections per image). Images without boxes are
dropped from training. The evaluation runs once, at the end; ``train.max_iter`` (default 300)
is the user's: epochs x images / 8 per batch.
"""

from detectron2.config import LazyCall as L

from cqdino.data import coco_json_dataset, coco_json_num_categories

from .demo import dataloader, lr_multiplier, model, name_words, optimizer, train

name_words(model, dataloader, False)

# the model's class count = the categories of the training json (contiguous ids 0..C-1 in
# sorted category-id order)
_NUM_CLASSES = L(coco_json_num_categories)(json_file="${dataloader.train.dataset.json_file}")

dataloader.train.dataset = L(coco_json_dataset)(
    names="custom_train", json_file="", image_root="", filter_empty=True
)
dataloader.test.dataset = L(coco_json_dataset)(
    names="custom_val", json_file="", image_root="", filter_empty=False
)
dataloader.train.mapper.num_classes = _NUM_CLASSES
dataloader.test.mapper.num_classes = _NUM_CLASSES
model.class_head.num_categories = _NUM_CLASSES

# photographs resized to a short side of 256-320 (step 32) in training, 320 at test, long side
# <= 480 (a training step of 8 COCO photographs: 1.6-1.8 s on one CPU core of the 2-vCPU VM,
# against 2.3-2.6 s at a short side of 320-416)
dataloader.train.mapper.min_sizes = (256, 288, 320)
dataloader.train.mapper.max_size = 480
dataloader.test.mapper.test_size = 320
dataloader.test.mapper.max_size = 480

# no category tree: category self-attention and the summed BCE selection loss (configs/coco.py)
model.class_head.relation = "self_attn"
model.class_head.tree_file = None
model.class_head.ancestor_masking = False
model.class_head.selection_loss = "bce"

# the length is the user's (epochs x images / 8 per batch); the LR drop (0.9) and the single
# evaluation follow train.max_iter
train.max_iter = 300
train.epochs = None
train.images_per_epoch = None
lr_multiplier.warmup_iters = 50
train.eval_period = "${.max_iter}"
train.checkpointer = dict(period="${..max_iter}", max_to_keep=2)
train.output_dir = "./output/custom_coco_small"

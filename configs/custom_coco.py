"""CQ-DINO on your own COCO-format dataset, with no Python to write: give the annotation files
and image folders as overrides; the config registers them (as ``custom_train`` /
``custom_val``) and takes the class count from the training json.

    python projects/train_net.py --config-file configs/custom_coco.py \\
        dataloader.train.dataset.json_file=my_data/annotations/train.json \\
        dataloader.train.dataset.image_root=my_data/images \\
        dataloader.test.dataset.json_file=my_data/annotations/val.json \\
        dataloader.test.dataset.image_root=my_data/images \\
        train.max_iter=20000 train.output_dir=output/my_data

The model and schedule are the COCO recipe (``coco.py``: R50, category self-attention, so no
category tree is needed, top-K 30, summed BCE selection loss x 0.1, AdamW lr 4e-4, batch 16);
``train.max_iter`` (and ``dataloader.train.total_batch_size``) should be set for the data:
epochs x images / batch. Evaluation is detectron2's ``COCOEvaluator`` on the val json. Images
without boxes are dropped from training (the log says how many).

The val json is required: the run evaluates on it every ``train.eval_period`` iterations and at
the end, and without it stops before training, in one line naming
``dataloader.test.dataset.json_file``. With no separate validation images, move some images
(with their boxes) from the training json into a val json, or give the training json and image
folder again as the val split (the AP then says how well the model fits its own training
images, not how it does on new ones). The val json must have the training json's categories
(the same ids and names, in any order); other categories stop the run before training.
"""

from detectron2.config import LazyCall as L

from cqdino.data import coco_json_dataset, coco_json_num_categories

from .coco import dataloader, lr_multiplier, model, optimizer, train

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

# the length is the user's to set (train.max_iter = epochs x images / batch); until then the
# COCO recipe's 87,950 iterations, which say nothing about this data's epochs
train.epochs = None
train.images_per_epoch = None
train.output_dir = "./output/custom_coco"

"""COCO 2017 loaders (detectron2's ``coco_2017_train`` / ``coco_2017_val`` under
``$DETECTRON2_DATASETS/coco``): the V3Det pieces with other names and 80 classes; detectron2's
``COCOEvaluator`` (100 dets/image, pycocotools)."""

from .v3det import dataloader

NUM_CLASSES = 80

dataloader.train.dataset.names = "coco_2017_train"
dataloader.train.mapper.num_classes = NUM_CLASSES
dataloader.test.dataset.names = "coco_2017_val"
dataloader.test.mapper.num_classes = NUM_CLASSES

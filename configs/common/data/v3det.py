"""V3Det loaders (``v3det_train`` / ``v3det_val`` under ``$DETECTRON2_DATASETS/V3Det``):
the DETR augmentation (flip, short side 480-800 step 32, long side <= 1333; test 800 x 1333),
batch 16, no resampling (the CQ-DINO recipe; the V3Det baselines set
``dataloader.train.repeat_threshold = 1e-3``), the V3Det-style evaluator (300 dets/image)."""

from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

from cqdino.data import DetrDatasetMapper
from cqdino.data.build import build_test_loader, build_train_loader, get_dataset_dicts
from cqdino.evaluation import build_evaluator

NUM_CLASSES = 13204

dataloader = OmegaConf.create()
dataloader.train = L(build_train_loader)(
    dataset=L(get_dataset_dicts)(names="v3det_train", filter_empty=True),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        num_classes=NUM_CLASSES,
        min_sizes=tuple(range(480, 801, 32)),
        max_size=1333,
        flip_prob=0.5,
        image_format="${model.input_format}",
    ),
    total_batch_size=16,
    num_workers=4,
    aspect_ratio_grouping=True,
    repeat_threshold=None,
    seed="${train.seed}",
)
dataloader.test = L(build_test_loader)(
    dataset=L(get_dataset_dicts)(names="v3det_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        num_classes=NUM_CLASSES,
        test_size=800,
        max_size=1333,
        image_format="${model.input_format}",
    ),
    num_workers=4,
)
dataloader.evaluator = L(build_evaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${train.output_dir}/inference"
)

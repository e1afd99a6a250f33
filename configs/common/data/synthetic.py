"""The synthetic vast vocabulary (``synthetic_vocab_{train,val}``, generated under
``$DETECTRON2_DATASETS/synthetic_vocab`` on first use: 1,000 long-tailed categories in a
category tree, 4,000 train / 500 val images of 256 x 320). Images keep their size (no resize),
horizontal flip; the V3Det-style evaluator."""

from .v3det import dataloader

NUM_CLASSES = 1000

dataloader.train.dataset.names = "synthetic_vocab_train"
dataloader.train.mapper.num_classes = NUM_CLASSES
dataloader.train.mapper.min_sizes = (256,)
dataloader.train.mapper.max_size = 320
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "synthetic_vocab_val"
dataloader.test.mapper.num_classes = NUM_CLASSES
dataloader.test.mapper.test_size = 256
dataloader.test.mapper.max_size = 320
dataloader.test.num_workers = 0

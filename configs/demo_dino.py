"""The DINO baseline at the demo's size: ``demo.py``'s backbone, neck, transformer, queries,
data and schedule with DINO's linear head over all 1,000 categories (focal loss over C) instead
of the category queries, selector and top-K (no encoder fusion, no decoder category attention).
The name-word loss and word scoring apply to a linear head as they are and are kept. For
like-for-like comparisons (``tools/compare_heads.py``)."""

from detectron2.config import LazyCall as L

from cqdino.data.build import category_words
from cqdino.modeling import DINO

from .common.models.dino_r50 import model as _dino
from .common.optim import AdamW as optimizer
from .demo import EMBED, dataloader, lr_multiplier, model
from .demo import optimizer as _demo_optimizer
from .demo import train

model._target_ = DINO
model.class_head = _dino.class_head
model.class_head.num_classes = 1000
model.class_head.embed_dim = EMBED
model.word_head.category_names = L(category_words)(  # the demo's words (names; tree off)
    dataset_name="${dataloader.train.dataset.names}",
    num_classes="${model.class_head.num_classes}",
    names=True,
    tree=False,
)
for key in ("stage1", "stage1_extra_trainable"):
    model.pop(key)
model.transformer.encoder.pop("fusion_layers")
model.transformer.decoder.pop("category_attn")
optimizer.lr = _demo_optimizer.lr
optimizer.fused = _demo_optimizer.fused
optimizer.params.module_multipliers = _demo_optimizer.params.module_multipliers
train.output_dir = "./output/demo_dino"

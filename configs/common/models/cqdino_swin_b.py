"""CQ-DINO-4scale Swin-B (the paper's main V3Det model): ``cqdino_r50.py`` with a timm Swin-B
(window 12) backbone; levels = stages 1-3 (strides 8/16/32, 256/512/1024 channels) + 1 extra."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from cqdino.modeling import TimmSwinBackbone

from .cqdino_r50 import model

model.backbone = L(TimmSwinBackbone)(
    variant="swin_b", out_indices=[1, 2, 3], drop_path_rate=0.3, freeze_patch_embed=False
)
model.neck.input_shapes = {
    "res3": L(ShapeSpec)(channels=256, stride=8),
    "res4": L(ShapeSpec)(channels=512, stride=16),
    "res5": L(ShapeSpec)(channels=1024, stride=32),
}

"""CQ-DINO-5scale Swin-L: ``cqdino_r50.py`` with a timm Swin-L (window 12) backbone and five
levels = all four stages (strides 4/8/16/32, 192/384/768/1536 channels) + 1 extra level."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from cqdino.modeling import TimmSwinBackbone

from .cqdino_r50 import model

model.backbone = L(TimmSwinBackbone)(
    variant="swin_l", out_indices=[0, 1, 2, 3], drop_path_rate=0.2, freeze_patch_embed=False
)
model.neck.input_shapes = {
    "res2": L(ShapeSpec)(channels=192, stride=4),
    "res3": L(ShapeSpec)(channels=384, stride=8),
    "res4": L(ShapeSpec)(channels=768, stride=16),
    "res5": L(ShapeSpec)(channels=1536, stride=32),
}
model.neck.in_features = ["res2", "res3", "res4", "res5"]
# 4 backbone levels + 1 extra = 5 feature levels everywhere in the transformer
model.transformer.num_levels = 5
model.transformer.encoder.num_levels = 5
model.transformer.decoder.num_levels = 5

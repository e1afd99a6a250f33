"""tools/feature_probe.py pools the backbone maps at the strides the model's backbone declares
(``output_shape()``), not at the ResNet strides: a backbone that halves its input first (every
stride doubled) is pooled at 16 / 32 / 64."""

import sys

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from torchvision.ops import roi_align

from tests.modeling.utils import tiny_dino

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from feature_probe import collect  # noqa: E402


class HalvingBackbone(Backbone):
    def __init__(self, inner: Backbone):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(F.avg_pool2d(x, 2))

    def output_shape(self):
        return {
            k: ShapeSpec(channels=s.channels, stride=2 * s.stride)
            for k, s in self.inner.output_shape().items()
        }


def test_probe_pools_at_the_declared_strides():
    torch.manual_seed(0)
    model = tiny_dino(5, 20, 1, 64, 128, width=16)
    model.backbone = HalvingBackbone(model.backbone)
    model.eval()
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1)) * 255
    loader = [[{"image": image, "width": 64, "height": 48, "image_id": 0}]]
    records = {0: {"annotations": [{"category_id": 0, "bbox": [5, 6, 20, 15]}]}}
    maps = {}
    hook = model.backbone.register_forward_hook(lambda m, i, o: maps.update(o))
    try:
        out = collect(model, loader, records, {1: (0, 1, 2, 1)}, 1)
    finally:
        hook.remove()
    box = torch.tensor([[5.0, 6.0, 25.0, 21.0]]) * 2  # the image is 2x the record's size
    strides = {"res3": 16, "res4": 32, "res5": 64}
    expected = torch.cat(
        [
            roi_align(maps[k][:1].float(), [box], 1, 1.0 / strides[k], aligned=True).flatten()
            for k in sorted(maps)
        ]
    )
    assert sorted(maps) == sorted(strides)
    torch.testing.assert_close(torch.from_numpy(out["backbone"][0]).float(), expected)

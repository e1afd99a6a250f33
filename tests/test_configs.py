"""Config paths: the yacs builder and the LazyConfig build the same DINO."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _signature(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_yacs_and_lazyconfig_build_the_same_model():
    from detectron2.config import LazyConfig, get_cfg, instantiate
    from detectron2.modeling import build_model

    import cqdino.modeling  # noqa: F401  (registers the meta-architecture)
    from cqdino.config import add_cqdino_config
    from cqdino.modeling import DINO

    cfg = get_cfg()
    add_cqdino_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DINO"
    cfg.MODEL.DEVICE = "cpu"
    yacs_model = build_model(cfg)

    lazy = LazyConfig.load(str(ROOT / "configs" / "common" / "models" / "dino_r50.py"))
    lazy_model = instantiate(lazy.model)

    assert isinstance(yacs_model, DINO) and isinstance(lazy_model, DINO)
    assert _signature(yacs_model) == _signature(lazy_model)
    assert lazy_model.transformer.num_queries == 900
    assert len(lazy_model.transformer.encoder.layers) == 6
    assert len(lazy_model.transformer.decoder.layers) == 6
    assert lazy_model.dn_generator.dn_number == 100
    assert lazy_model.class_head.num_classes == 80
    # from-scratch preset: trainable BN, nothing frozen
    assert all(p.requires_grad for p in yacs_model.parameters())
    assert all(p.requires_grad for p in lazy_model.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lazy_model.backbone.modules())
    assert torch.equal(yacs_model.pixel_std, lazy_model.pixel_std)


def test_lazyconfig_overrides_reach_the_model():
    from detectron2.config import LazyConfig, instantiate

    lazy = LazyConfig.load(str(ROOT / "configs" / "common" / "models" / "dino_r50.py"))
    lazy.model.backbone.depth = 18
    lazy.model.neck.input_shapes.res3.channels = 128
    lazy.model.neck.input_shapes.res4.channels = 256
    lazy.model.neck.input_shapes.res5.channels = 512
    lazy.model.transformer.decoder.num_layers = 2
    lazy.model.transformer.encoder.num_layers = 2
    lazy.model.class_head.num_classes = 13
    model = instantiate(lazy.model)
    # the class head follows the decoder depth by interpolation
    assert len(model.class_head.decoder_layers) == 2
    assert model.dn_generator.label_embed.num_embeddings == 13


@pytest.mark.slow
def test_yacs_swin_backbone_builds():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from cqdino.config import add_cqdino_config

    cfg = get_cfg()
    add_cqdino_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DINO"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_timm_swin_backbone"
    cfg.MODEL.DINO.ENC_LAYERS = cfg.MODEL.DINO.DEC_LAYERS = 1
    cfg.MODEL.DINO.NUM_QUERIES = 20
    model = build_model(cfg).eval()
    assert model.neck.strides == [8, 16, 32, 64]
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 100, 140) * 255}])
    assert len(out[0]["instances"]) > 0


def test_backbone_lr_multiplier_param_groups():
    from torch import nn

    from cqdino.modeling import get_dino_optimizer_params

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
            self.head = nn.Linear(2, 2)

    m = M()
    groups = get_dino_optimizer_params(
        m, base_lr=1e-4, weight_decay=1e-4, backbone_lr_multiplier=0.01
    )
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert lr[id(m.backbone[0].weight)] == pytest.approx(1e-6)
    assert lr[id(m.backbone[1].weight)] == pytest.approx(1e-6)
    assert lr[id(m.head.weight)] == pytest.approx(1e-4)
    assert wd[id(m.backbone[1].weight)] == 0.0 and wd[id(m.head.weight)] == 1e-4
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))

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


def test_pretrained_preset_and_optimizer_configs():
    from detectron2.config import LazyConfig, instantiate

    lazy = LazyConfig.load(str(ROOT / "configs" / "common" / "models" / "dino_r50_pretrained.py"))
    lazy.model.backbone.depth = 18
    for name, ch in (("res3", 128), ("res4", 256), ("res5", 512)):
        lazy.model.neck.input_shapes[name].channels = ch
    lazy.model.transformer.encoder.num_layers = 1
    lazy.model.transformer.decoder.num_layers = 1
    model = instantiate(lazy.model)
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert all(p.requires_grad for p in model.backbone.res2.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())

    optim = LazyConfig.load(str(ROOT / "configs" / "common" / "optim.py")).AdamW
    optim.params.model = model
    optim.params.backbone_lr_multiplier = 0.01
    opt = instantiate(optim)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.backbone.res2[0].conv1.weight)] == pytest.approx(1e-6)
    assert lrs[id(model.transformer.level_embed)] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- CQ-DINO
def _coco_cqdino_lazy():
    from detectron2.config import LazyConfig

    lazy = LazyConfig.load(str(ROOT / "configs" / "common" / "models" / "cqdino_r50.py"))
    head = lazy.model.class_head
    head.num_categories, head.topk, head.relation = 80, 30, "self_attn"
    head.tree_file, head.selection_loss = None, "bce"
    return lazy


@pytest.mark.slow
def test_cqdino_yacs_and_lazyconfig_build_the_same_model():
    from detectron2.config import get_cfg, instantiate
    from detectron2.modeling import build_model

    from cqdino.config import add_cqdino_config
    from cqdino.modeling import CQDINO, ContrastiveClassHead

    cfg = get_cfg()
    add_cqdino_config(cfg)  # MODEL.CQDINO defaults: the COCO recipe
    cfg.MODEL.META_ARCHITECTURE = "CQDINO"
    cfg.MODEL.DEVICE = "cpu"
    yacs_model = build_model(cfg)
    lazy_model = instantiate(_coco_cqdino_lazy().model)

    for m in (yacs_model, lazy_model):
        assert isinstance(m, CQDINO) and isinstance(m.class_head, ContrastiveClassHead)
        head = m.class_head
        assert head.num_categories == 80 and head.num_topk == 30
        assert head.category_queries.embeddings.shape == (80, 768)
        assert head.selector.input_proj.in_features == 2048  # R50 res5
        assert head.selector.layers[0].linear1.out_features == 3072
        assert head.selection_loss.weight == 0.1 and head.selection_loss.gamma_neg == 0
        assert m.dn_generator.label_embed.num_embeddings == 31  # K positions + "not selected"
        assert len(m.transformer.encoder.fusion_layers) == 6
        fusion = m.transformer.encoder.fusion_layers[0].fusion
        assert fusion.num_heads == 4 and fusion.image_query.out_features == 1024
        assert torch.all(fusion.image_gamma == 1e-4)
        assert all(layer.category_attn is not None for layer in m.transformer.decoder.layers)
        assert len(head.bias) == 7 and not m.stage1
    assert _signature(yacs_model) == _signature(lazy_model)


def test_cqdino_small_configs_with_a_category_tree(shared_data):
    """yacs: ids from the training dataset's metadata (COCO ids, 79 of them in the tree);
    LazyConfig: explicit ids (LVIS, 1202 of 1203 in the tree); both train one step."""
    from detectron2.config import get_cfg, instantiate
    from detectron2.modeling import build_model

    from cqdino.config import add_cqdino_config
    from tests.modeling.utils import batch

    cats = shared_data / "categories"
    cfg = get_cfg()
    add_cqdino_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "CQDINO"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ("coco_2017_train",)  # detectron2's builtin COCO metadata
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    d, c = cfg.MODEL.DINO, cfg.MODEL.CQDINO
    d.HIDDEN_DIM, d.DIM_FEEDFORWARD, d.ENC_LAYERS, d.DEC_LAYERS, d.NUM_QUERIES = 64, 128, 1, 1, 20
    d.DN_NUMBER = 10
    c.QUERY_DIM, c.SELECTOR_MEMORY_DIM, c.SELECTOR_FFN_DIM, c.FUSION_DIM = 32, 32, 64, 64
    c.RELATION, c.TREE_FILE, c.SELECTION_LOSS, c.TOPK = (
        "tree",
        str(cats / "coco80_wordnet_tree.json"),
        "asl",
        10,
    )
    model = build_model(cfg)
    head = model.class_head
    assert head.ancestor_mask is not None and head.selection_loss.gamma_neg == 7
    assert head.category_queries.relation.num_categories == 80
    losses = model(batch([(64, 64, 2)], 80))
    assert "loss_select" in losses and torch.isfinite(sum(losses.values()))

    from detectron2.config import LazyConfig

    lazy = LazyConfig.load(str(ROOT / "configs" / "common" / "models" / "cqdino_r50.py"))
    lazy.model.backbone.depth = 18
    for name, ch in (("res3", 128), ("res4", 256), ("res5", 512)):
        lazy.model.neck.input_shapes[name].channels = ch
    lazy.model.transformer.encoder.num_layers = lazy.model.transformer.decoder.num_layers = 1
    lazy.model.transformer.num_queries = 20
    head = lazy.model.class_head
    head.tree_file = str(cats / "lvis_v1_wordnet_tree.json")
    head.num_categories, head.category_ids = 1203, list(range(1, 1204))
    head.query_dim, head.selector_memory_dim, head.selector_ffn_dim = 32, 32, 64
    model = instantiate(lazy.model)
    assert model.class_head.selector.input_proj.in_features == 512  # follows the neck
    assert len(model.class_head.bias) == 2 and len(model.transformer.encoder.fusion_layers) == 1
    assert model.class_head.category_queries.relation.num_categories == 1203
    assert model.dn_generator.label_embed.num_embeddings == 101


def test_cqdino_swin_configs_are_consistent():
    from detectron2.config import LazyConfig

    expect = {"cqdino_swin_b": ([256, 512, 1024], 4), "cqdino_swin_l": ([192, 384, 768, 1536], 5)}
    for name, (channels, levels) in expect.items():
        lazy = LazyConfig.load(str(ROOT / "configs" / "common" / "models" / f"{name}.py"))
        m = lazy.model
        shapes = [m.neck.input_shapes[f].channels for f in m.neck.in_features]
        assert shapes == channels
        assert len(m.backbone.out_indices) == len(m.neck.in_features)
        assert m.transformer.num_levels == levels == len(channels) + m.neck.num_extra_levels
        assert m.transformer.encoder.num_levels == m.transformer.decoder.num_levels == levels
        assert m.class_head.in_channels == channels[-1]  # selector reads the last stage


def test_cqdino_optimizer_recipe_multipliers():
    """From scratch every group has the base lr / decay; the pretrained preset puts the backbone
    and class_head.category_queries (only those) at lr x 0.01 and weight decay x 10."""
    from detectron2.config import LazyConfig, instantiate

    from tests.modeling.cqdino_utils import tiny_cqdino

    model = tiny_cqdino(10, topk=3, num_queries=10)
    names = {id(p): n for n, p in model.named_parameters()}
    for pretrained in (False, True):
        optim = LazyConfig.load(str(ROOT / "configs" / "common" / "optim_cqdino.py")).AdamW
        optim.params.model = model
        optim.params.multipliers.pretrained = pretrained
        opt = instantiate(optim)
        seen = 0
        for g in opt.param_groups:
            for p in g["params"]:
                n = names[id(p)]
                seen += 1
                scaled = pretrained and n.startswith(("backbone.", "class_head.category_queries."))
                norm = p.dim() == 1 and ("norm" in n or ".bn" in n or "backbone" in n)
                lr, wd = (4e-6, 1e-3) if scaled else (4e-4, 1e-4)
                assert g["lr"] == pytest.approx(lr), n
                if not norm:  # norm layers have weight decay 0 (x 10 = 0)
                    assert g["weight_decay"] == pytest.approx(wd), n
        assert seen == len(names)

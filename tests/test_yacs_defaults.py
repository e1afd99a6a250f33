"""The yacs defaults are the COCO recipe, as cqdino/config.py documents (the LazyConfig
CQ-DINO model config is V3Det)."""

from detectron2.config import get_cfg

import cqdino.config
from cqdino.config import add_cqdino_config


def test_yacs_defaults_are_the_documented_coco_recipe():
    cfg = get_cfg()
    add_cqdino_config(cfg)
    assert cfg.MODEL.DINO.NUM_CLASSES == 80
    c = cfg.MODEL.CQDINO
    assert (c.RELATION, c.TOPK, c.SELECTION_LOSS, c.TREE_FILE) == ("self_attn", 30, "bce", "")
    assert cfg.INPUT.FORMAT == "BGR"  # detectron2's, matching its BGR pixel mean
    doc = " ".join(cqdino.config.__doc__.split())
    assert "yacs defaults here are the **COCO** recipe" in doc
    assert "is the **V3Det** recipe instead: 13,204 categories, tree aggregation" in doc
    assert 'category_tree_file("v3det_train")' in doc

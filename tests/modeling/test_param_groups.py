"""Stage-1 parameter selection and lr / weight-decay multipliers of the category modules."""

import pytest
import torch
from torch import nn

from cqdino.modeling import (
    CategoryQueries,
    CategorySelector,
    TreeAggregation,
    category_module_names,
    freeze_for_stage1,
    get_optimizer_params,
    recipe_multipliers,
    stage1_trainable,
)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
        self.category_queries = CategoryQueries(4, 16, relation=TreeAggregation([[1], [], [], []]))
        self.selector = CategorySelector(
            8, num_topk=2, query_dim=16, memory_dim=8, num_heads=2, ffn_dim=16, out_dim=8
        )
        self.head = nn.Linear(8, 8)


def _lookup(groups):
    out = {}
    for g in groups:
        for p in g["params"]:
            out[p] = (g.get("lr"), g.get("weight_decay"))
    return out


def test_stage1_selection_and_freeze():
    m = _Toy()
    assert category_module_names(m) == {
        "category_queries": ["category_queries"],
        "category_selector": ["selector"],
    }
    names = stage1_trainable(m)
    expected = sorted(
        n for n, _ in m.named_parameters() if n.startswith(("category_queries.", "selector."))
    )
    assert sorted(names) == expected
    assert set(stage1_trainable(m, ["backbone"])) == set(expected) | {
        n for n, _ in m.named_parameters() if n.startswith("backbone.")
    }
    frozen = freeze_for_stage1(m)
    assert frozen == expected
    for n, p in m.named_parameters():
        assert p.requires_grad == (n in expected), n
    with pytest.raises(ValueError, match="no CategoryQueries"):
        stage1_trainable(nn.Linear(2, 2))


def test_optimizer_params_multipliers():
    m = _Toy()
    groups = get_optimizer_params(
        m,
        base_lr=1e-3,
        weight_decay=1e-4,
        weight_decay_norm=0.0,
        multipliers=recipe_multipliers(pretrained=True),
    )
    hp = _lookup(groups)
    assert len(hp) == sum(1 for _ in m.parameters())
    close = pytest.approx
    assert hp[m.backbone[0].weight] == (close(1e-5), close(1e-3))
    assert hp[m.backbone[1].weight] == (close(1e-5), 0.0)  # norm: wd 0 stays 0
    assert hp[m.category_queries.embeddings] == (close(1e-5), close(1e-3))
    assert hp[m.category_queries.norm.weight] == (close(1e-5), 0.0)
    assert hp[m.selector.score.weight] == (1e-3, 1e-4)  # the selector is new: full lr
    assert hp[m.head.bias] == (1e-3, 1e-4)
    # from scratch: every multiplier 1; the groups match detectron2's defaults
    from detectron2.solver import get_default_optimizer_params

    ours = _lookup(
        get_optimizer_params(
            m,
            base_lr=1e-3,
            weight_decay=1e-4,
            weight_decay_norm=0.0,
            multipliers=recipe_multipliers(pretrained=False),
            overrides={"bias": {"lr": 5e-4}},
        )
    )
    d2 = _lookup(
        get_default_optimizer_params(
            m,
            base_lr=1e-3,
            weight_decay=1e-4,
            weight_decay_norm=0.0,
            overrides={"bias": {"lr": 5e-4}},
        )
    )
    assert ours == d2
    # the groups build a working optimizer
    torch.optim.AdamW(groups, lr=1e-3)


def test_optimizer_params_bad_prefix():
    with pytest.raises(ValueError, match="categroy"):
        get_optimizer_params(_Toy(), 1e-3, 1e-4, multipliers={"categroy": (0.1, 1.0)})
    with pytest.raises(ValueError, match="base_lr"):
        get_optimizer_params(_Toy(), multipliers={"backbone": (0.1, 1.0)})


def test_module_multipliers_match_a_module_name_anywhere():
    m = _Toy()
    groups = get_optimizer_params(
        m,
        base_lr=1e-3,
        weight_decay=1e-4,
        module_multipliers={"cross_attn": (0.1, 2.0)},
        multipliers={"selector": (0.5, 1.0)},
    )
    hp = _lookup(groups)
    for name, p in m.named_parameters():
        if ".cross_attn." in name:  # both apply: 1e-3 x 0.5 x 0.1
            assert hp[p][0] == pytest.approx(5e-5) and hp[p][1] == pytest.approx(2e-4)
        elif name.startswith("selector."):
            assert hp[p][0] == pytest.approx(5e-4)
        else:
            assert hp[p][0] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="module 'sampling_offsets'"):
        get_optimizer_params(
            m, base_lr=1e-3, weight_decay=1e-4, module_multipliers={"sampling_offsets": (0.1, 1)}
        )

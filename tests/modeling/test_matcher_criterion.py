"""Hungarian matcher against brute force, and the criterion on hand-made cases."""

import itertools
import math

import pytest
import torch
from torchvision.ops import generalized_box_iou as tv_giou
from torchvision.ops import sigmoid_focal_loss as tv_focal

from cqdino.modeling import HungarianMatcher, SetCriterion


def _xyxy(b):
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)


def reference_cost(logits, boxes, labels, gt, wc=2.0, wb=5.0, wg=2.0, alpha=0.25, gamma=2.0):
    """Independent float64 cost matrix [Q, G], written element by element."""
    Q, G = logits.shape[0], gt.shape[0]
    giou = tv_giou(_xyxy(boxes.double()), _xyxy(gt.double()))
    cost = torch.zeros(Q, G, dtype=torch.float64)
    for q in range(Q):
        for g in range(G):
            cls = 0.0
            if labels[g] >= 0:
                p = torch.sigmoid(logits[q, labels[g]].double()).item()
                pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
                neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
                cls = pos - neg
            l1 = (boxes[q].double() - gt[g].double()).abs().sum().item()
            cost[q, g] = wc * cls + wb * l1 - wg * giou[q, g].item()
    return cost


def brute_force_min(cost):
    Q, G = cost.shape
    return min(
        sum(cost[q, g].item() for g, q in enumerate(perm))
        for perm in itertools.permutations(range(Q), G)
    )


def rand_boxes(n, gen):
    c = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([c, wh], 1)


@pytest.mark.parametrize("Q,G", [(4, 1), (5, 3), (6, 4), (4, 4)])
@pytest.mark.parametrize("unselected", [False, True])
def test_matcher_matches_enumeration(Q, G, unselected, rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    N = 3
    for _ in range(5):
        logits = torch.randn(1, Q, N, generator=gen) * 3
        boxes = rand_boxes(Q, gen)[None]
        labels = torch.randint(0, N, (G,), generator=gen)
        if unselected:
            labels[0] = -1  # class cost 0 for this GT: matched on its box only
        gt = rand_boxes(G, gen)
        ((q, g),) = HungarianMatcher()(logits, boxes, [{"labels": labels, "boxes": gt}])
        assert len(q) == len(g) == G and len(set(q.tolist())) == G
        ref = reference_cost(logits[0], boxes[0], labels, gt)
        total = sum(ref[a, b].item() for a, b in zip(q.tolist(), g.tolist()))
        assert total == pytest.approx(brute_force_min(ref), abs=1e-5)


def test_matcher_empty_targets():
    ((q, g),) = HungarianMatcher()(
        torch.randn(1, 5, 3),
        torch.rand(1, 5, 4),
        [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
    )
    assert q.numel() == 0 and g.numel() == 0


def test_match_sets_with_a_set_without_queries(rng_seed):
    """A set with no queries gets empty pairs; the other set is still solved (brute force)."""
    gen = torch.Generator().manual_seed(rng_seed)
    t = [{"labels": torch.tensor([1, 0]), "boxes": rand_boxes(2, gen)}]
    logits, boxes = torch.randn(1, 4, 3, generator=gen), rand_boxes(4, gen)[None]
    none, ((q, g),) = HungarianMatcher().match_sets(
        [(torch.zeros(1, 0, 3), torch.zeros(1, 0, 4)), (logits, boxes)], t
    )
    assert none[0][0].numel() == 0 and none[0][1].numel() == 0
    cost = reference_cost(logits[0], boxes[0], t[0]["labels"], t[0]["boxes"])
    assert sorted(g.tolist()) == [0, 1]
    assert cost[q, g].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-5)


def _criterion():
    return SetCriterion(HungarianMatcher())


def _targets(gen, n=3, N=4):
    return [{"labels": torch.randint(0, N, (n,), generator=gen), "boxes": rand_boxes(n, gen)}]


def test_perfect_prediction_has_zero_box_loss(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    Q, N = 8, 4
    t = _targets(gen, 3, N)
    boxes = rand_boxes(Q, gen)[None]
    logits = torch.full((1, Q, N), -20.0)
    slots = torch.tensor([5, 1, 6])
    boxes[0, slots] = t[0]["boxes"]
    logits[0, slots, t[0]["labels"]] = 20.0
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, t)
    assert losses["loss_bbox"].item() < 1e-6
    assert losses["loss_giou"].item() < 1e-3  # eps = 1e-7 in the IoU: ~1e-4 for small boxes
    assert losses["loss_class"].item() < 1e-6


def test_focal_loss_and_normalisation_against_torchvision(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    Q, N = 6, 5
    t = _targets(gen, 3, N)
    logits = torch.randn(1, Q, N, generator=gen)
    boxes = rand_boxes(Q, gen)[None]
    crit = _criterion()
    indices = crit.matcher(logits, boxes, t)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, t)
    q, g = indices[0]
    onehot = torch.zeros(1, Q, N)
    onehot[0, q, t[0]["labels"][g]] = 1
    ref_cls = tv_focal(logits.double(), onehot.double(), 0.25, 2.0, "sum") / 3
    ref_l1 = (boxes[0, q] - t[0]["boxes"][g]).abs().sum() / 3
    ref_giou = (1 - torch.diag(tv_giou(_xyxy(boxes[0, q]), _xyxy(t[0]["boxes"][g])))).sum() / 3
    assert losses["loss_class"].item() == pytest.approx(ref_cls.item(), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * ref_l1.item(), rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 * ref_giou.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["iou", "align"])
def test_iou_aware_class_target_against_a_float64_reference(rng_seed, kind):
    """The matched column's target is IoU (or p^a IoU^(1-a)); the loss is BCE(p, t)|t - p|^2
    weighted 0.25 on the targets > 0 and 0.75 elsewhere, written out here in float64."""
    from torchvision.ops import box_iou as tv_iou

    gen = torch.Generator().manual_seed(rng_seed)
    Q, N = 6, 5
    t = _targets(gen, 3, N)
    logits = torch.randn(1, Q, N, generator=gen)
    boxes = rand_boxes(Q, gen)[None]
    crit = SetCriterion(
        HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0), iou_target=kind
    )
    q, g = crit.matcher(logits, boxes, t)[0]
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, t)
    x = logits.double()[0]
    p = x.sigmoid()
    iou = torch.diag(tv_iou(_xyxy(boxes[0, q]).double(), _xyxy(t[0]["boxes"][g]).double()))
    iou = iou.clamp(min=0.01)
    cols = t[0]["labels"][g]
    target = torch.zeros(Q, N, dtype=torch.float64)
    target[q, cols] = iou if kind == "iou" else p[q, cols] ** 0.25 * iou**0.75
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    w = torch.where(target > 0, 0.25, 0.75)
    ref = (w * bce * (target - p).abs() ** 2).sum() / 3
    assert losses["loss_class"].item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="iou_target"):
        SetCriterion(crit.matcher, iou_target="varifocal")


def test_permuted_queries_give_the_same_loss(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    Q, N = 10, 4
    t = _targets(gen, 4, N)
    logits = torch.randn(1, Q, N, generator=gen)
    boxes = rand_boxes(Q, gen)[None]
    perm = torch.randperm(Q, generator=gen)
    a = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, t)
    b = _criterion()({"pred_logits": logits[:, perm], "pred_boxes": boxes[:, perm]}, t)
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-5, abs=1e-7), k


def test_unselected_target_has_zero_class_row_but_box_loss(rng_seed):
    """A GT with label -1 (no logit column) is matched and box-supervised; its query's focal
    target row is all zero."""
    gen = torch.Generator().manual_seed(rng_seed)
    Q, N = 6, 3
    gt = rand_boxes(2, gen)
    t = [{"labels": torch.tensor([-1, 2]), "boxes": gt}]
    logits = torch.randn(1, Q, N, generator=gen)
    boxes = rand_boxes(Q, gen)[None]
    crit = _criterion()
    ((q, g),) = crit.matcher(logits, boxes, t)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, t)
    onehot = torch.zeros(1, Q, N)
    for qi, gi in zip(q.tolist(), g.tolist()):
        if gi == 1:
            onehot[0, qi, 2] = 1
    ref_cls = tv_focal(logits, onehot, 0.25, 2.0, "sum") / 2
    ref_l1 = (boxes[0, q] - gt[g]).abs().sum() / 2
    assert losses["loss_class"].item() == pytest.approx(ref_cls.item(), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * ref_l1.item(), rel=1e-5)


def test_match_sets_solves_every_set_against_the_enumeration(rng_seed):
    """Several prediction sets matched in one call (one host transfer): each set's assignment
    has the brute-force minimum cost of that set; images without GT give empty pairs."""
    gen = torch.Generator().manual_seed(rng_seed)
    Q, N = 5, 3
    targets = [
        {"labels": torch.tensor([0, -1, 2]), "boxes": rand_boxes(3, gen)},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    sets = [(torch.randn(2, Q, N, generator=gen) * 3, rand_boxes(2 * Q, gen).view(2, Q, 4))]
    sets.append((torch.randn(2, Q, N, generator=gen), rand_boxes(2 * Q, gen).view(2, Q, 4)))
    out = HungarianMatcher().match_sets(sets, targets)
    assert len(out) == 2
    for (logits, boxes), per_image in zip(sets, out):
        (q, g), (q1, g1) = per_image
        cost = reference_cost(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"])
        assert sorted(g.tolist()) == [0, 1, 2] and len(set(q.tolist())) == 3
        assert cost[q, g].sum().item() == pytest.approx(brute_force_min(cost), rel=1e-5)
        assert q1.numel() == 0 and g1.numel() == 0
    bad = sets[0][0].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher().match_sets([(bad, sets[0][1])], targets)


def test_batched_cost_and_match_sets_over_images_and_set_shapes(rng_seed):
    """Images with different GT counts and sets of two shapes: every column of the batched
    cost is the float64 reference against its own image's queries (and so is the one-image
    ``cost_matrix``), and every image's assignment has the brute-force minimum of that
    image's cost."""
    gen = torch.Generator().manual_seed(rng_seed)
    counts = [2, 0, 3, 1]
    targets = [
        {"labels": torch.randint(-1, 4, (n,), generator=gen), "boxes": rand_boxes(n, gen)}
        for n in counts
    ]
    B = len(targets)
    sets = [
        (torch.randn(B, Q, N, generator=gen) * 3, rand_boxes(B * Q, gen).view(B, Q, 4))
        for Q, N in ((5, 4), (4, 6), (5, 4))
    ]
    matcher = HungarianMatcher()
    labels = torch.cat([t["labels"] for t in targets])
    gt = torch.cat([t["boxes"] for t in targets])
    image = torch.tensor([b for b, n in enumerate(counts) for _ in range(n)])
    logits, boxes = sets[0]
    batched = matcher.batched_cost(logits, boxes, labels, gt, image)
    for g in range(len(labels)):  # float32 costs (the focal log near p = 0 or 1) against float64
        b = image[g].item()
        ref = reference_cost(logits[b], boxes[b], labels[g : g + 1], gt[g : g + 1])
        torch.testing.assert_close(batched[:, g].double(), ref[:, 0], rtol=1e-3, atol=1e-2)
    one = matcher.cost_matrix(logits[2], boxes[2], targets[2]["labels"], targets[2]["boxes"])
    ref = reference_cost(logits[2], boxes[2], targets[2]["labels"], targets[2]["boxes"])
    torch.testing.assert_close(one.double(), ref, rtol=1e-3, atol=1e-2)
    out = matcher.match_sets(sets, targets)
    for (logits, boxes), per_image in zip(sets, out):
        for b, ((q, g), t) in enumerate(zip(per_image, targets)):
            assert len(q) == len(g) == counts[b] and len(set(q.tolist())) == counts[b]
            if counts[b]:
                cost = reference_cost(logits[b], boxes[b], t["labels"], t["boxes"])
                assert cost[q, g].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-4)


def test_no_gt_gives_finite_losses():
    t = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    logits = torch.randn(1, 5, 3, requires_grad=True)
    boxes = torch.rand(1, 5, 4, requires_grad=True)
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, t)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert logits.grad is not None and boxes.grad is not None
    assert losses["loss_bbox"].item() == 0.0


def test_aux_enc_and_dn_keys():
    gen = torch.Generator().manual_seed(0)
    t = _targets(gen, 2, 3)
    out = lambda: {"pred_logits": torch.randn(1, 6, 3), "pred_boxes": torch.rand(1, 6, 4)}  # noqa
    outputs = dict(
        out(), aux_outputs=[out(), out()], enc_outputs=out(), dn_outputs=[out(), out(), out()]
    )
    dn_meta = {"num_groups": 1, "indices": [(torch.tensor([0, 1]), torch.tensor([0, 1]))]}
    losses = _criterion()(outputs, t, dn_meta)
    expect = {
        f"loss_{k}{s}"
        for k in ("class", "bbox", "giou")
        for s in ("", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1")
    }
    assert set(losses) == expect


CASES = [((3, 1), 2.0), ((0, 0), 1.0), ((1, 0), 1.0)]  # per-rank GT counts -> normaliser


def _num_boxes_worker(rank, world, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, (counts, _) in enumerate(CASES):
            t = [
                {
                    "labels": torch.zeros(counts[rank], dtype=torch.long),
                    "boxes": torch.rand(counts[rank], 4),
                }
            ]
            results[(rank, i)] = float(_criterion().num_boxes(t, torch.device("cpu")))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_num_boxes_is_averaged_over_ranks_and_clamped(tmp_path):
    """Two gloo ranks: the normaliser is the all-reduced GT count / world size, >= 1, and ranks
    without GT do not hang."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_num_boxes_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
    for i, (_, expect) in enumerate(CASES):
        assert results[(0, i)] == expect and results[(1, i)] == expect, (i, dict(results))

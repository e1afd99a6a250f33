#!/usr/bin/env python
"""Gradient dilution measured on trained runs: the classification loss's positive-to-negative
gradient ratio per frequency group, at each saved checkpoint of a ``train_net.py`` run.

    DETECTRON2_DATASETS=<root of the run's data> \\
    python tools/gradient_dilution_runs.py output/run_a [output/run_b ...] \\
        [--checkpoints init model_0000799.pth model_final.pth] [--images 128] [--json J]

For each run folder (its ``config.yaml`` and checkpoints, DINO or CQ-DINO) and each checkpoint
(``init``: the untrained model built from the run's config and seed; default: ``init``, every
``model_*.pth`` of the folder in iteration order, ``model_final.pth`` last), the model is loaded
in training mode and the run's own training loss is computed and back-propagated on the same
fixed training images (``--images``, the first images of a seeded permutation of the run's
training split, mapped by the run's training mapper with fixed random seeds, so every checkpoint
and every run on the same data sees the same batches); the weights are not updated. For every
category c::

    pos_c = sum of |dL/dlogit| over the logit entries whose target is positive for c
            (a matched query and its GT's column)
    neg_c = sum of |dL/dlogit| over the other entries of c's column(s)

where L is the run's whole weighted training loss and the logits are those of

* ``final``: the last decoder layer's matched queries (the set the detector is evaluated on);
* ``all``: every prediction set with a classification loss (all decoder layers, the encoder
  proposals, the DN groups);
* ``selection`` (CQ-DINO only): the selector's ``[B, C]`` scores under the selection loss,
  positive = the category is in the image (the loss through which every category still sees
  every image).

Columns map to categories through the class head: DINO's columns are the C classes; CQ-DINO's
are the K categories selected per image. Per frequency group of the training split (the V3Det
evaluator's groups, rare: <= 10 training images, common: 11-100, frequent: > 100; categories
without training images left out, as in ``tools/gradient_dilution.py``) the table gives
the pooled ratio (sum of pos_c over sum of neg_c) and the mean of ratio_c over the group's
categories whose ratio is defined (a category that got no column has no negatives). ``run``
rows pool the sums of all checkpoints of a run: the run's checkpoints stand in for the whole
run; the gradients between checkpoints are not seen.

A check that the taps see the whole gradient: on the first batch, every prediction set's tapped
gradient is compared with the closed-form derivative of its focal loss in float64 (binary
targets; ``tap_rel_err`` in the JSON: the largest absolute difference over the largest entry;
``tests/engine/test_gradient_dilution_runs.py``).
"""

import argparse
import contextlib
import glob
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's cqdino, not an installed one
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "tools"))

from cqdino.utils import quiet_imports  # noqa: E402, F401  (before detectron2 / torch.jit users)

# isort: split

from common import format_table, machine_info  # noqa: E402
from gradient_dilution import group_stats  # noqa: E402

from cqdino.evaluation.v3det_evaluation import FREQUENCY_GROUPS  # noqa: E402
from cqdino.utils.io import InputError, atomic_write  # noqa: E402

LOSSES = ("final", "all", "selection")


# ---------------------------------------------------------------- accounting
def column_sums(
    grad: torch.Tensor, positive: torch.Tensor, indices: Optional[torch.Tensor], num_categories: int
):
    """Per-category sums of ``|grad|`` over positive and over negative entries.

    Args:
        grad: ``[B, Q, N]`` gradient of the loss w.r.t. the logits.
        positive: ``[B, Q, N]`` bool, the positive entries.
        indices: ``[B, N]`` category of each column per image, or None (column n = category n).
        num_categories: C.

    Returns:
        ``(pos, neg)``, float64 ``[C]`` each.
    """
    g = grad.detach().abs().double()
    p = positive.to(g.dtype)
    pos_col = (g * p).sum(1)  # (B, N)
    neg_col = (g * (1 - p)).sum(1)
    pos = torch.zeros(num_categories, dtype=torch.float64)
    neg = torch.zeros(num_categories, dtype=torch.float64)
    if indices is None:
        if grad.shape[-1] != num_categories:
            raise ValueError(f"{grad.shape[-1]} columns for {num_categories} categories")
        return pos + pos_col.sum(0).cpu(), neg + neg_col.sum(0).cpu()
    cats = indices.reshape(-1).cpu()
    pos.index_add_(0, cats, pos_col.reshape(-1).cpu())
    neg.index_add_(0, cats, neg_col.reshape(-1).cpu())
    return pos, neg


def focal_grad(x: torch.Tensor, positive: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """d/dx of the element-wise sigmoid focal loss with binary targets, in closed form, float64
    (an independent reference for the tapped gradients)::

        t = 1:  L = -alpha (1 - p)^g log p         dL/dx = alpha (1 - p)^g (g p log p - (1 - p))
        t = 0:  L = -(1 - alpha) p^g log(1 - p)    dL/dx = (1 - alpha) p^g (p - g (1-p) log(1-p))
    """
    x = x.detach().double()
    p = torch.sigmoid(x)
    log_p, log_q = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
    d_pos = alpha * (1 - p) ** gamma * (gamma * p * log_p - (1 - p))
    d_neg = (1 - alpha) * p**gamma * (p - gamma * (1 - p) * log_q)
    return torch.where(positive.to(x.device), d_pos, d_neg)


# ---------------------------------------------------------------- taps on a model
class Taps:
    """Keeps, for one forward/backward, each prediction set's logits (gradient retained), their
    positive entries and the loss they enter, through the library's observers
    (:meth:`SetCriterion.observe`, :meth:`DINO.observe_class_state`) and a forward hook on
    CQ-DINO's selector (its scores); :meth:`close` removes them."""

    def __init__(self, model):
        self.model = model
        self.sets: List[dict] = []
        self.state = None
        self.scores: List[torch.Tensor] = []
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(model.criterion.observe(self._loss_set))
        self._stack.enter_context(model.observe_class_state(self._class_state))
        selector = getattr(model.class_head, "selector", None)
        if selector is not None:  # its output's scores [B, C] enter the selection loss
            hook = selector.register_forward_hook(self._score)
            self._stack.callback(hook.remove)

    def _loss_set(self, pred_logits, targets, indices, num_boxes, quality):
        if pred_logits.requires_grad:
            pred_logits.retain_grad()
        B, Q, N = pred_logits.shape
        positive = torch.zeros(B, Q, N, dtype=torch.bool)
        for b, ((q, g), t) in enumerate(zip(indices, targets)):
            lab = t["labels"][g.to(t["labels"].device)].cpu()
            keep = lab >= 0
            positive[b, q.cpu()[keep], lab[keep]] = True
        binary = not quality or getattr(self.model.criterion, "iou_target", "none") == "none"
        self.sets.append(
            dict(logits=pred_logits, positive=positive, binary=binary, num_boxes=num_boxes)
        )

    def _class_state(self, state):
        self.state = state

    def _score(self, module, inputs, output):
        if output.scores.requires_grad:
            output.scores.retain_grad()
        self.scores.append(output.scores)

    def clear(self):
        self.sets, self.state, self.scores = [], None, []

    def close(self):
        self._stack.close()


# ---------------------------------------------------------------- one run
def _checkpoint_iter(path: str) -> float:
    m = re.search(r"model_(\d+)\.pth$", path)
    return int(m.group(1)) if m else float("inf")


def run_checkpoints(run_dir: str, names: Optional[Sequence[str]]) -> List[str]:
    """``init`` and the run's checkpoint files, checked to exist (one-line errors)."""
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise InputError(f"{run_dir}: no config.yaml (not a train_net.py run folder)")
    if names:
        out = []
        for n in names:
            if n != "init" and not os.path.isfile(os.path.join(run_dir, n)):
                raise InputError(f"{os.path.join(run_dir, n)}: no such checkpoint")
            out.append(n)
        return out
    files = sorted(glob.glob(os.path.join(run_dir, "model_*.pth")), key=_checkpoint_iter)
    if not files:
        raise InputError(f"{run_dir}: no model_*.pth checkpoint")
    return ["init"] + [os.path.basename(f) for f in files]


def load_run(run_dir: str, data_root: Optional[str]):
    """The run's config with its datasets registered, its training dicts and category counts."""
    if data_root:
        os.environ["DETECTRON2_DATASETS"] = data_root
    from detectron2.config import LazyConfig
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from cqdino.data import register_synthetic_vocab
    from cqdino.data.build import register_config_datasets

    cfg = LazyConfig.load(os.path.join(run_dir, "config.yaml"))
    register_synthetic_vocab(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    register_config_datasets(cfg)
    name = cfg.dataloader.train.dataset.names
    name = name[0] if isinstance(name, (list, tuple)) else name
    num_classes = len(MetadataCatalog.get(name).get("thing_classes") or [])
    head = cfg.model.class_head
    want = head.get("num_categories", head.get("num_classes"))
    if want != num_classes:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
        raise InputError(
            f"{run_dir} was trained with {want} categories but {name} under {root} has "
            f"{num_classes}: set DETECTRON2_DATASETS (or --data-root) to the run's data"
        )
    dicts = DatasetCatalog.get(name)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for d in dicts:
        for c in {a["category_id"] for a in d.get("annotations", [])}:
            counts[c] += 1
    return cfg, dicts, counts


def fixed_batches(cfg, dicts, images: int, batch: int, seed: int = 0):
    """``images`` training images (a seeded permutation's first ones), mapped with fixed seeds,
    in batches of ``batch``; the same for every checkpoint."""
    from detectron2.config import instantiate
    from detectron2.utils.env import seed_all_rng

    mapper = instantiate(cfg.dataloader.train.mapper)
    order = np.random.default_rng(seed).permutation(len(dicts))[:images]
    out = []
    for i in range(0, len(order), batch):
        seed_all_rng(seed + 1 + i)
        out.append([mapper(dict(dicts[j])) for j in order[i : i + batch]])
    return out


def measure(model, batches, num_categories: int) -> Dict[str, dict]:
    """Sums of |dL/dlogit| per category over ``batches`` (see module doc); no weight update."""
    from detectron2.utils.env import seed_all_rng

    sums = {k: [torch.zeros(num_categories, dtype=torch.float64) for _ in range(2)] for k in LOSSES}
    taps = Taps(model)
    err = scale = 0.0
    alpha, gamma = model.criterion.focal_alpha, model.criterion.focal_gamma
    try:
        for i, batch in enumerate(batches):
            taps.clear()
            model.zero_grad(set_to_none=True)
            seed_all_rng(10_000 + i)  # DN noise and dropout: the same for every checkpoint
            losses = model(batch)
            sum(losses.values()).backward()
            indices = taps.state.indices if taps.state is not None else None
            for k, s in enumerate(taps.sets):
                if s["logits"].grad is None:
                    continue
                grad = s["logits"].grad
                pos, neg = column_sums(grad, s["positive"], indices, num_categories)
                for key in ("final", "all") if k == 0 else ("all",):
                    sums[key][0] += pos
                    sums[key][1] += neg
                if i == 0 and s["binary"]:  # the tap against the closed-form derivative
                    ref = focal_grad(s["logits"], s["positive"], alpha, gamma)
                    ref = ref * model.criterion.weights["loss_class"] / float(s["num_boxes"])
                    err = max(err, float((grad.double().cpu() - ref.cpu()).abs().max()))
                    scale = max(scale, float(ref.abs().max()))
            if taps.scores:
                g = taps.scores[0].grad.detach().abs().double().cpu()  # (B, C)
                present = torch.zeros_like(g, dtype=torch.bool)
                for b, x in enumerate(batch):
                    present[b, x["instances"].gt_classes] = True
                sums["selection"][0] += (g * present).sum(0)
                sums["selection"][1] += (g * ~present).sum(0)
    finally:
        taps.close()
        model.zero_grad(set_to_none=True)
    out = {k: {"pos": v[0], "neg": v[1]} for k, v in sums.items() if float(v[1].sum()) > 0}
    out["_check"] = {"tap_rel_err": err / scale if scale else None}
    return out


def measure_run(run_dir: str, args) -> List[dict]:
    from detectron2.config import instantiate
    from detectron2.utils.env import seed_all_rng

    from cqdino.engine import load_weights_strict

    names = run_checkpoints(run_dir, args.checkpoints)
    cfg, dicts, counts = load_run(run_dir, args.data_root)
    C = len(counts)
    batches = fixed_batches(cfg, dicts, args.images, args.batch)
    head = "CQ-DINO" if cfg.model._target_.endswith("CQDINO") else "DINO"
    rows, total = [], {}
    for name in names:
        t0 = time.perf_counter()
        seed_all_rng(cfg.train.seed)
        model = instantiate(cfg.model)
        if name != "init":
            load_weights_strict(model, os.path.join(run_dir, name))
        model.train()
        sums = measure(model, batches, C)
        check = sums.pop("_check")["tap_rel_err"]
        for loss, s in sums.items():
            t = total.setdefault(loss, {"pos": 0, "neg": 0})
            t["pos"], t["neg"] = t["pos"] + s["pos"], t["neg"] + s["neg"]
            for g in group_stats(s["pos"].tolist(), s["neg"].tolist(), counts):
                row = dict(run=run_dir, head=head, C=C, checkpoint=name, loss=loss, **g)
                rows.append(dict(row, tap_rel_err=check))
        print(
            f"{run_dir} {name}: {time.perf_counter() - t0:.0f} s, tapped gradient vs closed "
            f"form: max error {check:.1e} of the largest entry",
            file=sys.stderr,
            flush=True,
        )
    for loss, s in total.items():
        for g in group_stats(s["pos"].tolist(), s["neg"].tolist(), counts):
            rows.append(dict(run=run_dir, head=head, C=C, checkpoint="run", loss=loss, **g))
    return rows


def summarise(rows: List[dict]) -> List[dict]:
    """The pooled ratio over the runs of one (head, C, checkpoint, loss, group): mean, min and
    max over the runs where it is defined (e.g. two seeds), in the rows' order."""
    keys: Dict[tuple, List[float]] = {}
    for r in rows:
        k = (r["head"], r["C"], r["checkpoint"], r["loss"], r["group"])
        vals = keys.setdefault(k, [])
        if r["pooled_ratio"] is not None:
            vals.append(r["pooled_ratio"])
    out = []
    for (head, C, ckpt, loss, group), vals in keys.items():
        row = dict(head=head, C=C, checkpoint=ckpt, loss=loss, group=group, runs=len(vals))
        row.update(
            pooled_mean=sum(vals) / len(vals) if vals else None,
            pooled_min=min(vals) if vals else None,
            pooled_max=max(vals) if vals else None,
        )
        out.append(row)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="train_net.py output folders")
    ap.add_argument("--checkpoints", nargs="+", default=None, help="default: init + all")
    ap.add_argument("--data-root", default=None, help="default: $DETECTRON2_DATASETS")
    ap.add_argument("--images", type=int, default=128, help="fixed training images")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows here (atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    args = ap.parse_args(argv)
    if args.json and os.path.exists(args.json) and not args.overwrite:
        print(f"error: --json {args.json} exists: add --overwrite to replace it", file=sys.stderr)
        return 2
    if args.images < 1 or args.batch < 1:
        ap.error("--images and --batch must be positive")
    for run in args.runs:  # every folder checked before anything slow starts
        try:
            run_checkpoints(run, args.checkpoints)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    rows: List[dict] = []
    try:
        for run in args.runs:
            rows += measure_run(run, args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cols = ["run", "head", "C", "checkpoint", "loss", "group", "categories", "defined"]
    cols += ["mean_ratio", "pooled_ratio"]
    print(format_table(rows, cols))
    summary = summarise(rows)
    print("\nover the runs of one head and C (pooled ratio: mean, min-max over the runs):")
    scols = ["head", "C", "checkpoint", "loss", "group", "runs", "pooled_mean", "pooled_min"]
    print(format_table(summary, scols + ["pooled_max"]))
    payload = {
        "info": dict(machine_info("cpu"), elapsed_s=round(time.perf_counter() - t0, 1)),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "groups": [list(g) for g in FREQUENCY_GROUPS],
        "rows": rows,
        "summary": summary,
    }
    if args.json:
        text = json.dumps(payload, indent=1)
        atomic_write(args.json, lambda f: f.write(text), mode="w", overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())

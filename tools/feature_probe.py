#!/usr/bin/env python
"""Do a trained detector's features carry the attributes of the synthetic vocabulary?

For every ground-truth box of ``--images`` images of a training and a validation split, two
feature vectors are collected from a trained model (eval mode, the test-time resize):

* ``decoder``: the last decoder layer's output for the query whose box overlaps the GT box
  most (what the classification head scores against the category tokens), and
* ``backbone``: the backbone's output maps (every stage the model reads) average-pooled inside
  the GT box (``roi_align``, one bin per stage), concatenated.

A linear probe (:func:`cqdino.evaluation.diagnostics.linear_probe`) per attribute (shape,
colour, texture, border) is fitted on the training split's vectors and scored on the
validation split's; a probe near the majority baseline means the features do not carry the
attribute, whatever the head does with them. The median IoU of the best query per GT box
separates "not localised" from "not named".

    python tools/feature_probe.py --config-file configs/demo.py \\
        --weights output/demo/model_final.pth --images 200 --json output/demo/probe.json

Works on configs over the synthetic vocabulary (``synthetic_vocab*`` splits: the attributes
come from the generator's ``meta.json``).
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _fail(msg: str) -> None:
    print(f"feature_probe: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def collect(model, loader, records, attributes, images: int) -> Dict[str, np.ndarray]:
    """Features and attribute labels of every GT box of the first ``images`` images."""
    import torch
    from torchvision.ops import box_iou, roi_align

    cap: dict = {}
    # the backbone's maps and their strides, as the model declares them
    strides = {name: shape.stride for name, shape in model.backbone.output_shape().items()}

    def keep_boxes(module, inputs, output):  # (hidden, boxes, enc_outputs, state)
        cap["boxes"] = output[1][-1]  # the last decoder layer's boxes (no DN at inference)

    def keep_hidden(module, inputs, output):
        cap["hidden"] = inputs[0]  # the last call of a forward is the last decoder layer

    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: cap.__setitem__("maps", o)),
        model.transformer.register_forward_hook(keep_boxes),
        model.class_head.register_forward_hook(keep_hidden),
    ]
    dec, bb, labels, ious = [], [], [], []
    try:
        with torch.no_grad():
            for n, batch in enumerate(loader):
                if n >= images:
                    break
                cap.clear()
                model(batch)
                for b, inp in enumerate(batch):
                    rec = records[inp["image_id"]]
                    W, H = inp["width"], inp["height"]
                    scale = inp["image"].shape[-1] / W
                    cx, cy, w, h = cap["boxes"][b].unbind(-1)
                    pred = torch.stack(
                        [(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H], -1
                    )
                    for ann in rec["annotations"]:
                        attr = attributes.get(ann["category_id"] + 1)
                        if attr is None or len(attr) != 4:
                            continue  # a shape-level label has no colour/texture/border
                        x, y, bw, bh = ann["bbox"]
                        gt = torch.tensor([[x, y, x + bw, y + bh]], dtype=pred.dtype)
                        iou = box_iou(gt, pred)[0]
                        q = int(iou.argmax())
                        dec.append(cap["hidden"][b, q].double().numpy())
                        pooled = [
                            roi_align(
                                fm[b : b + 1].float().contiguous(),
                                [gt * scale],
                                output_size=1,
                                spatial_scale=1.0 / strides[name],
                                aligned=True,
                            ).flatten()
                            for name, fm in sorted(cap["maps"].items())
                        ]
                        bb.append(torch.cat(pooled).double().numpy())
                        labels.append(attr)
                        ious.append(float(iou[q]))
    finally:
        for hook in hooks:
            hook.remove()
    if not labels:
        raise ValueError("no ground-truth box with four attributes in the probed images")
    return dict(
        decoder=np.stack(dec), backbone=np.stack(bb), labels=np.array(labels), ious=np.array(ious)
    )


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--weights", required=True, help="trained model (.pth)")
    ap.add_argument("--train-split", default="synthetic_vocab_train")
    ap.add_argument("--val-split", default="synthetic_vocab_val")
    ap.add_argument("--images", type=int, default=200, help="images per split (default 200)")
    ap.add_argument("--json", help="write the results here (refuses an existing file)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.config_file):
        _fail(f"--config-file {args.config_file} does not exist")
    if not os.path.isfile(args.weights):
        _fail(f"--weights {args.weights} does not exist")
    if args.images < 1:
        _fail(f"--images must be >= 1, got {args.images}")
    if args.json and os.path.exists(args.json):
        _fail(f"--json {args.json} exists; not overwritten")
    for split in (args.train_split, args.val_split):
        if not split.startswith("synthetic_vocab"):
            _fail(f"{split}: the probe needs a synthetic_vocab* split (attributes)")

    sys.path.insert(0, str(ROOT))
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import DatasetCatalog

    import cqdino.data  # noqa: F401  (registers the datasets)
    from cqdino.data.synthetic import category_attributes, read_meta
    from cqdino.engine import load_weights_strict, use_ema_weights
    from cqdino.evaluation.diagnostics import ATTRIBUTES, linear_probe
    from cqdino.utils.io import atomic_write

    results: Dict[str, Dict[str, Tuple]] = {}
    feats = {}
    for split in (args.train_split, args.val_split):
        cfg = LazyConfig.load(args.config_file)
        cfg = LazyConfig.apply_overrides(
            cfg, list(args.opts) + [f"dataloader.test.dataset.names={split}"]
        )
        model = instantiate(cfg.model)
        load_weights_strict(model, args.weights, use_ema=use_ema_weights(cfg))
        model.eval()
        records = {r["image_id"]: r for r in DatasetCatalog.get(split)}
        # <root>/images/<split>/<id>.jpg: the generator's folder holds meta.json
        meta = read_meta(str(Path(next(iter(records.values()))["file_name"]).parents[2]))
        attrs = category_attributes(meta["num_categories"], meta["seed"])
        feats[split] = collect(model, instantiate(cfg.dataloader.test), records, attrs, args.images)
    tr, va = feats[args.train_split], feats[args.val_split]
    print(
        f"best query per GT box: median IoU {np.median(va['ious']):.2f} (val), "
        f"{100 * np.mean(va['ious'] >= 0.5):.0f}% at IoU >= 0.5"
    )
    print(f"{'features':9s} {'attribute':9s} {'train %':>8s} {'val %':>6s} {'majority %':>10s}")
    for source in ("decoder", "backbone"):
        results[source] = {}
        for k, name in enumerate(ATTRIBUTES):
            r = linear_probe(tr[source], tr["labels"][:, k], va[source], va["labels"][:, k])
            results[source][name] = r
            print(f"{source:9s} {name:9s} {r['train']:8.1f} {r['val']:6.1f} {r['majority']:10.1f}")
    if args.json:
        out = dict(
            results,
            median_iou=float(np.median(va["ious"])),
            boxes=dict(train=len(tr["labels"]), val=len(va["labels"])),
            weights=os.path.abspath(args.weights),
        )
        atomic_write(args.json, lambda f: json.dump(out, f, indent=1), mode="w", overwrite=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

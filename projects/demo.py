#!/usr/bin/env python
"""Run a trained DINO / CQ-DINO on images: drawn detections and one JSON of all detections.

    python projects/demo.py --config-file configs/demo.py --input img.jpg more/ \\
        --output out/ --confidence 0.3 train.init_checkpoint=output/demo/model_final.pth
    python projects/demo.py --model demo.onnx --input img.jpg --output out/   # exported file

``--model FILE`` runs a ``.onnx`` / ``.pt2`` written by ``tools/export.py`` through
:class:`cqdino.predictor.Predictor` instead of a config and checkpoint: the class names, channel
order and test resize come from the file's metadata.

The model is ``cfg.model`` with the weights of ``train.init_checkpoint`` (the EMA weights when
``train.ema`` is enabled and the checkpoint holds them, as ``train_net.py --eval-only`` does).
Images are read in ``model.input_format`` and resized as ``cfg.dataloader.test.mapper`` resizes
(shortest side ``test_size``, longest side <= ``max_size``); boxes are reported in the input
image's pixels. The checkpoint must fit the config exactly (every tensor, same shapes), or
nothing is drawn. Category names are those saved with the model (``class_names`` in checkpoints
of ``projects/train_net.py``), else the ``thing_classes`` of the training dataset
(``dataloader.train.dataset.names``); the log and ``detections.json`` say which. Device:
``train.device`` (the CPU when CUDA is absent). 16-bit images are scaled to 8 bit.

A directory is expanded to the image files directly inside it (.jpg .jpeg .png .bmp .webp).
Outputs in ``--output``: ``<stem>.jpg`` per image (boxes and names drawn; ``<stem>_1.jpg`` ...
when stems repeat) and ``detections.json``::

    {"config": ..., "checkpoint": ..., "confidence": ...,
     "images": [{"file", "output", "width", "height",
                 "detections": [{"bbox": [x0, y0, x1, y1], "score", "category_id",
                                 "category_name"}]}],
     "errors": [{"file", "reason"}]}

``category_id`` is the contiguous id (0 .. C-1, the model's class index). Unreadable inputs
(missing, not an image, corrupt) are logged, listed under ``errors`` and skipped. Exit status 0
when at least one image was processed, else 1. Every file is written atomically. ``--output``
must not be the folder of an input image (a drawn image would replace it), and bad overrides, a
checkpoint of another config or an unwritable ``--output`` stop the tool with one line before
any image is read. The tool never generates a dataset (the synthetic vocabulary is looked for
under ``$DETECTRON2_DATASETS``, as in training).
"""

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from cqdino.utils import quiet_imports  # noqa: F401  (before detectron2: see its docstring)

# isort: split

import cv2
import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer

from cqdino.data import DetrDatasetMapper
from cqdino.data.build import register_config_datasets
from cqdino.data.datasets import generation_disabled
from cqdino.data.mapper import read_image
from cqdino.engine import (
    atomic_write,
    checkpoint_ema_state,
    load_weights_strict,
    resolve_device,
    use_ema_weights,
)
from cqdino.engine.config_check import load_config, validate_config
from cqdino.utils.cli import options_first
from cqdino.utils.io import InputError, check_not_inputs, check_output_dir

__all__ = [
    "IMAGE_EXTENSIONS",
    "Predictor",
    "setup_cfg",
    "load_predictor",
    "read_input",
    "predict",
    "draw",
    "to_records",
    "expand_inputs",
    "main",
]

logger = logging.getLogger("cqdino.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# a trailing ``key=value`` config override (``train.init_checkpoint=...``)
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)*=")


@dataclass
class Predictor:
    """A model in eval mode and what is needed to feed it and name its classes."""

    model: torch.nn.Module
    augmentations: List[T.Augmentation]  # the test mapper's resize
    input_format: str  # channel order the model expects ("BGR" / "RGB")
    class_names: List[str]  # contiguous id -> name
    device: torch.device
    class_names_source: str = ""  # where the names came from (logged, in detections.json)
    exported: Optional[object] = None  # a cqdino.predictor.Predictor of --model FILE


def load_exported(path: str) -> Predictor:
    """``--model FILE``: an exported model (``.onnx`` / ``.pt2`` of ``tools/export.py``) with
    the class names, channel order and test resize of its metadata; no config, no model
    code."""
    from cqdino.predictor import Predictor as FilePredictor

    runner = FilePredictor(path)
    runner.array_format = runner.input_format  # read_input gives the model's channel order
    return Predictor(
        model=None,
        augmentations=[],
        input_format=runner.input_format,
        class_names=runner.class_names,
        device=torch.device("cpu"),
        class_names_source=f"the metadata of {path}",
        exported=runner,
    )


def setup_cfg(config_file: str, opts: Sequence[str] = ()):
    """The LazyConfig ``config_file`` with detectron2-style ``key=value`` overrides (an
    unknown key or a bad value is an :class:`~cqdino.utils.io.InputError`)."""
    cfg = load_config(config_file, list(opts))
    validate_config(cfg)
    register_config_datasets(cfg)  # datasets given by path (configs/custom_coco.py)
    return cfg


def _test_augmentations(cfg) -> List[T.Augmentation]:
    """The resize of ``cfg.dataloader.test.mapper`` (a ``DetrDatasetMapper``), so inference
    sees images at the size evaluation does; detectron2's default 800 x 1333 without one."""
    mapper_cfg = cfg.dataloader.test.get("mapper") if "dataloader" in cfg else None
    if mapper_cfg is None or "test" not in cfg.dataloader:
        logger.warning("no dataloader.test.mapper in the config: resizing to 800 x 1333")
        return DetrDatasetMapper(is_train=False, num_classes=1).augmentation
    mapper = instantiate(mapper_cfg)
    if getattr(mapper, "is_train", False):
        raise ValueError("dataloader.test.mapper is a training mapper (is_train=True)")
    return list(mapper.augmentation)


def _class_names(cfg, num_classes: int, checkpoint: Optional[dict] = None) -> Tuple[List[str], str]:
    """(names, where they came from): the ``class_names`` saved in the checkpoint; else the
    ``thing_classes`` of the first training dataset (loaded once if its registration is lazy);
    else ``class <i>``."""
    saved = (checkpoint or {}).get("class_names")
    ckpt = cfg.train.get("init_checkpoint", "") if "train" in cfg else ""
    if saved is not None:
        if len(saved) != num_classes:
            raise InputError(
                f"the checkpoint {ckpt} names {len(saved)} classes but the model has "
                f"{num_classes}: use the config it was trained with"
            )
        return list(saved), f"the checkpoint {ckpt}"
    dataset = cfg.dataloader.train.get("dataset") if "dataloader" in cfg else None
    name = None
    if dataset is not None and "names" in dataset and dataset.names:
        value = dataset.names
        name = value if isinstance(value, str) else list(value)[0]
    names = None
    if name is not None and name in DatasetCatalog.list():
        names = MetadataCatalog.get(name).get("thing_classes")
        if names is None:
            try:  # a lazy registration (register_coco_instances) sets them when loaded
                DatasetCatalog.get(name)
                names = MetadataCatalog.get(name).get("thing_classes")
            except Exception as e:
                logger.warning(f"cannot load dataset {name!r} for its class names: {e}")
    if names is not None and len(names) == num_classes:
        return list(names), f"the metadata of dataset {name!r} (the checkpoint holds none)"
    why = (
        f"dataset {name!r} has {len(names)} classes, the model {num_classes}"
        if names is not None
        else "the checkpoint holds none and no training dataset has thing_classes"
    )
    return [f"class {i}" for i in range(num_classes)], f"numbered ({why})"


def _use_saved_category_names(cfg, checkpoint: str) -> None:
    """A model whose structure follows its category names (compositional queries: one word
    vector per distinct word) is built from the names saved with its checkpoint, not from
    whatever dataset is registered now."""
    head = cfg.model.get("class_head") if "model" in cfg else None
    if not checkpoint or head is None or head.get("category_names") is None:
        return
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True).get("class_names")
    except Exception:  # unreadable: load_weights_strict reports it in one line
        return
    if saved:
        head.category_names = list(saved)


def load_predictor(cfg) -> Predictor:
    """Build ``cfg.model``, load ``train.init_checkpoint`` (weights only) and put it in eval
    mode on ``train.device`` (the CPU when CUDA is not available)."""
    device = resolve_device(cfg)
    checkpoint = cfg.train.get("init_checkpoint", "") if "train" in cfg else ""
    if checkpoint and not os.path.isfile(checkpoint):
        raise InputError(f"train.init_checkpoint={checkpoint}: no such file")
    _use_saved_category_names(cfg, checkpoint)
    with generation_disabled():  # inference never creates a dataset (e.g. for its tree)
        model = instantiate(cfg.model)
    extra = {}
    if checkpoint:
        use_ema = use_ema_weights(cfg)
        extra = load_weights_strict(model, checkpoint, use_ema=use_ema)  # all tensors, same shapes
        if use_ema and checkpoint_ema_state(extra) is not None:
            logger.info("using the checkpoint's EMA weights (train.ema.enabled)")
    else:
        logger.warning("no train.init_checkpoint given: the detections come from untrained weights")
    model.to(device).eval()
    num_classes = model.class_head.num_classes
    input_format = getattr(model, "input_format", "BGR")
    class_names, source = _class_names(cfg, num_classes, extra)
    (logger.warning if source.startswith("numbered") else logger.info)(f"category names: {source}")
    return Predictor(
        model=model,
        augmentations=_test_augmentations(cfg),
        input_format=input_format,
        class_names=class_names,
        device=device,
        class_names_source=source,
    )


def read_input(path: str, image_format: str = "BGR") -> np.ndarray:
    """(H, W, 3) uint8 image of ``path`` in ``image_format`` (EXIF orientation applied).
    Raises ``OSError`` or ``ValueError`` with the reason when it cannot be read."""
    if not os.path.exists(path):
        raise FileNotFoundError("no such file")
    if not os.path.isfile(path):
        raise OSError("not a regular file")
    try:
        image = read_image(path, format=image_format)  # 16-bit images scaled to 8 bit
    except Exception as e:  # PIL raises many types for corrupt or foreign files
        raise OSError(f"not a readable image ({type(e).__name__}: {e})") from e
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
        raise ValueError(f"unsupported image shape {image.shape}")
    return image


@torch.no_grad()
def predict(predictor: Predictor, image: np.ndarray, confidence: float = 0.0) -> Instances:
    """Detections of one image (``(H, W, 3)`` uint8 in ``predictor.input_format``): the
    model's ``Instances`` (boxes in the image's pixels) with ``score >= confidence``, on CPU."""
    height, width = image.shape[:2]
    if predictor.exported is not None:  # --model FILE: resize, pad and map back inside
        det = predictor.exported(image, confidence)
        return Instances(
            (height, width),
            pred_boxes=Boxes(torch.from_numpy(det.boxes)),
            scores=torch.from_numpy(det.scores),
            pred_classes=torch.from_numpy(det.classes),
        )
    aug_input = T.AugInput(image)
    T.AugmentationList(predictor.augmentations)(aug_input)
    tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
    inputs = {"image": tensor.to(predictor.device), "height": height, "width": width}
    instances = predictor.model([inputs])[0]["instances"].to("cpu")
    return instances[instances.scores >= confidence]


def draw(
    image: np.ndarray, instances: Instances, class_names: Sequence[str], image_format: str = "BGR"
) -> np.ndarray:
    """``image`` (in ``image_format``) with the boxes, names and scores drawn (detectron2's
    ``Visualizer``); returns an RGB uint8 array of the image's size."""
    rgb = image[:, :, ::-1] if image_format == "BGR" else image
    visualizer = Visualizer(rgb, Metadata(thing_classes=list(class_names)))
    return visualizer.draw_instance_predictions(instances).get_image()


def to_records(instances: Instances, class_names: Sequence[str]) -> List[Dict]:
    """JSON-ready detections: xyxy ``bbox`` in pixels, ``score``, contiguous ``category_id``
    and ``category_name``, by decreasing score."""
    boxes = instances.pred_boxes.tensor.tolist()
    scores = instances.scores.tolist()
    classes = instances.pred_classes.tolist()
    records = [
        {
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
            "category_id": int(c),
            "category_name": class_names[c],
        }
        for box, score, c in zip(boxes, scores, classes)
    ]
    return sorted(records, key=lambda r: -r["score"])


def expand_inputs(inputs: Sequence[str]) -> Tuple[List[str], List[Dict[str, str]]]:
    """(files, errors): directories replaced by the image files directly inside them
    (sorted), duplicates dropped; a missing path or an image-less directory is an error."""
    files, errors, seen = [], [], set()
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, f)
                for f in os.listdir(path)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))
            )
            if not found:
                reason = f"directory without image files ({' '.join(IMAGE_EXTENSIONS)})"
                errors.append({"file": path, "reason": reason})
        elif not os.path.exists(path):
            errors.append({"file": path, "reason": "no such file or directory"})
            found = []
        else:
            found = [path]
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, errors


def _output_name(stem: str, used: set) -> str:
    name, i = f"{stem}.jpg", 0
    while name in used:
        i += 1
        name = f"{stem}_{i}.jpg"
    used.add(name)
    return name


def _write_jpg(path: str, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise OSError(f"cannot encode {path}")
    atomic_write(path, lambda f: f.write(buf.tobytes()))


def _split_overrides(inputs: List[str], opts: List[str]) -> Tuple[List[str], List[str]]:
    """``--input a.jpg train.x=1`` puts the override into ``--input``: move ``key=value``
    items that are not existing paths to the overrides."""
    keep, moved = [], []
    for item in inputs:
        (moved if _OVERRIDE.match(item) and not os.path.exists(item) else keep).append(item)
    return keep, moved + opts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Detect objects in images with a trained DINO / CQ-DINO.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", metavar="FILE", help="LazyConfig file")
    parser.add_argument(
        "--model",
        metavar="FILE",
        help="an exported model (.onnx / .pt2 of tools/export.py) instead of --config-file and "
        "a checkpoint: class names and preprocessing come from its metadata",
    )
    parser.add_argument(
        "--input", required=True, nargs="+", metavar="PATH", help="image files or directories"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--confidence", type=float, default=0.3, help="minimum score of a kept detection"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides key=value (LazyConfig keys)"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    # options may follow the overrides, as for train_net.py (``... key=value --confidence 0.5``)
    args = parser.parse_args(options_first(parser, argv, keep_paths=True))
    if not args.config_file and not args.model:
        parser.error("give --config-file (with train.init_checkpoint=...) or --model FILE")
    if not 0.0 <= args.confidence <= 1.0:
        parser.error(f"--confidence must be in [0, 1], got {args.confidence}")
    args.input, args.opts = _split_overrides(args.input, list(args.opts))
    if not args.input:
        parser.error("--input: no image files or directories given")
    return args


def check_output(output: str, files: Sequence[str]) -> List[str]:
    """The output name of each input file (``<stem>.jpg``, ``<stem>_1.jpg`` ... when stems
    repeat), after checking that ``--output`` can be written and that no output replaces an
    input: the folder of an input image is refused as ``--output``."""
    check_output_dir(output, "--output")
    out_real = os.path.realpath(output)
    for f in files:
        if os.path.dirname(os.path.realpath(f)) == out_real:
            raise InputError(
                f"--output {output} is the folder of the input image {f}: the drawn images "
                "would be written among (and over) the inputs; choose another --output"
            )
    used: set = set()
    names = [_output_name(Path(f).stem, used) for f in files]
    outputs = [os.path.join(output, n) for n in names + ["detections.json"]]
    check_not_inputs(outputs, files, "--output", "choose another --output")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    files, errors = expand_inputs(args.input)
    for e in errors:
        logger.warning(f"skipping {e['file']}: {e['reason']}")
    try:
        output_names = check_output(args.output, files)  # before any model is built
        if args.model:
            check_not_inputs(
                [os.path.join(args.output, n) for n in output_names], [args.model], "--output"
            )
            cfg, predictor = None, load_exported(args.model)
        else:
            cfg = setup_cfg(args.config_file, args.opts)
            predictor = load_predictor(cfg)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        logger.error(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
        return 1

    os.makedirs(args.output, exist_ok=True)
    images = []
    for i, (path, name) in enumerate(zip(files, output_names)):
        try:
            image = read_input(path, predictor.input_format)
        except (OSError, ValueError) as e:
            logger.warning(f"skipping {path}: {e}")
            errors.append({"file": path, "reason": str(e)})
            continue
        instances = predict(predictor, image, args.confidence)
        _write_jpg(
            os.path.join(args.output, name),
            draw(image, instances, predictor.class_names, predictor.input_format),
        )
        images.append(
            {
                "file": path,
                "output": name,
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "detections": to_records(instances, predictor.class_names),
            }
        )
        logger.info(f"[{i + 1}/{len(files)}] {path}: {len(instances)} detections -> {name}")

    result = {
        "config": args.config_file,
        "checkpoint": (
            args.model
            if cfg is None
            else (cfg.train.get("init_checkpoint", "") if "train" in cfg else "")
        ),
        "confidence": args.confidence,
        "class_names_source": predictor.class_names_source,
        "images": images,
        "errors": errors,
    }
    json_path = os.path.join(args.output, "detections.json")
    atomic_write(json_path, lambda f: json.dump(result, f, indent=1), mode="w")
    if not images:
        logger.error(
            f"no image was processed: none of the {len(args.input)} inputs could be read "
            f"(see 'errors' in {json_path})"
        )
        return 1
    logger.info(
        f"{len(images)} images processed, {len(errors)} skipped; drawn images and "
        f"detections.json in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

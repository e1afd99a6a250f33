"""DETR-style dataset mapper with strict record checks.

Training augmentation (the CQ-DINO / DINO recipe): horizontal flip 0.5, shortest side random in
480..800 step 32, longest side <= 1333; optionally DETR's crop branch (with probability 0.5:
resize to 400/500/600, random crop 384..600, then the multi-scale resize). Test: 800 x 1333.

Every record is checked before use: missing file, unreadable image, image size different from
the record, box with width/height <= 0 or outside the image, unknown category id. A bad record
raises :class:`RecordError` naming the image id and file, or, with ``skip_bad_records=True``, is
skipped (the mapper returns None, so detectron2's ``MapDataset`` draws another image) and
counted in :attr:`DetrDatasetMapper.num_skipped`. Boxes that become degenerate through
augmentation (cropped away) are dropped.

An image at least twice as large as the resizes need is read reduced (JPEG: decoded at 1/2, 1/4
or 1/8; others: shrunk by an integer factor after decoding), so a 10000 x 10000 photo costs tens
of MB instead of gigabytes; boxes stay in the record's full-size frame.

The output image is BGR by default (detectron2's convention: its ``pixel_mean`` defaults are the
BGR ImageNet mean); ``num_classes`` is required, so category ids are always checked.
"""

import copy
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

__all__ = [
    "DetrDatasetMapper",
    "RecordError",
    "build_detr_augmentation",
    "read_image",
    "read_image_for_resize",
    "IMAGE_FORMATS",
]

logger = logging.getLogger(__name__)

# Channel orders the mapper can produce (3-channel; detectron2's default is "BGR").
IMAGE_FORMATS = ("BGR", "RGB")


class RecordError(ValueError):
    """A dataset record that cannot be used (the message names image id and file)."""


# single-channel 16-bit modes (PNG, TIFF): PIL's convert("RGB") clips them at 255, so a
# 16-bit image would read as (nearly) all white
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(file_name: str, format: str = "BGR") -> np.ndarray:
    """detectron2's ``read_image`` (EXIF orientation applied, ``format`` channel order), with
    16-bit grey images (PNG/TIFF) scaled to 8 bit instead of clipped. 16-bit colour images
    Pillow reads at 8 bit already; images it cannot scale (32-bit integer or float pixels)
    raise ``ValueError`` naming the mode."""
    return read_image_for_resize(file_name, format)[0]


# An image sent to ``ResizeShortestEdge(short, long)`` is resized by min(short / its short
# side, long / its long side); (short, long) pairs describe what a mapper's resizes need.
Fit = Sequence[Tuple[float, float]]


def _reduction(height: int, width: int, fit: Optional[Fit]) -> int:
    """The largest integer factor an image may be shrunk by before resizes to ``fit`` without
    any of them having to enlarge it (1: none)."""
    if not fit:
        return 1
    short, long = min(height, width), max(height, width)
    return max(1, int(min(max(short / s, long / lg) for s, lg in fit)))


def read_image_for_resize(
    file_name: str, format: str = "BGR", fit: Optional[Fit] = None
) -> Tuple[np.ndarray, Tuple[int, int]]:
    """:func:`read_image`, read at a reduced size when the image is at least twice as large
    as the resizes in ``fit`` need (a 10000 x 10000 photo for an 800 x 1333 input): JPEG files
    are decoded at 1/2, 1/4 or 1/8 of their size (the full image is never held), others are
    shrunk by an integer factor right after decoding (``Image.reduce``).

    Returns:
        the image and ``(height, width)`` of the full image after EXIF orientation (the frame
        the annotations are in).
    """
    from PIL import Image

    with Image.open(file_name) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112)  # EXIF orientation
        except Exception:  # as detectron2: broken EXIF is ignored
            orientation = None
        if orientation in (5, 6, 7, 8):  # transposed
            width, height = height, width
        factor = _reduction(height, width, fit)
        if factor > 1 and image.format == "JPEG":
            w, h = image.size
            image.draft(image.mode, (-(-w // factor), -(-h // factor)))
        image = utils._apply_exif_orientation(image)
        if image.mode in _16BIT_MODES:
            pixels = np.asarray(image).astype(np.int64)
            if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
                raise ValueError(
                    f"{image.mode} pixels in [{pixels.min()}, {pixels.max()}] are not 16-bit: "
                    "convert the image to 8 or 16 bit"
                )
            image = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")
        elif image.mode == "F":
            raise ValueError("floating-point pixels (mode F): convert the image to 8 or 16 bit")
        rest = _reduction(image.height, image.width, fit)
        if rest > 1:
            if image.mode not in ("L", "RGB", "RGBA", "LA", "I", "F"):
                image = image.convert("RGB")
            image = image.reduce(rest)
        return utils.convert_PIL_to_numpy(image, format), (height, width)


def build_detr_augmentation(
    is_train: bool,
    min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    test_size: int = 800,
    flip_prob: float = 0.5,
) -> List[T.Augmentation]:
    """The resize/flip augmentation list (without the crop branch)."""
    if not is_train:
        return [T.ResizeShortestEdge(test_size, max_size)]
    augs: List[T.Augmentation] = []
    if flip_prob > 0:
        augs.append(T.RandomFlip(prob=flip_prob, horizontal=True))
    augs.append(T.ResizeShortestEdge(list(min_sizes), max_size, sample_style="choice"))
    return augs


class DetrDatasetMapper:
    """Map a detectron2 dataset dict to the model input (``image``, ``instances``)."""

    def __init__(
        self,
        is_train: bool = True,
        *,
        num_classes: int,
        min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
        max_size: int = 1333,
        test_size: int = 800,
        flip_prob: float = 0.5,
        crop: bool = False,
        crop_resize: Sequence[int] = (400, 500, 600),
        crop_size: Sequence[int] = (384, 600),
        image_format: str = "BGR",
        skip_bad_records: bool = False,
        box_tolerance: float = 1.0,
    ):
        """
        Args:
            is_train: training (augment, keep annotations) or inference.
            num_classes: number of categories C; record category ids must lie in ``[0, C)``
                (required, so an unknown category can never reach the model).
            min_sizes, max_size: training multi-scale resize; test_size: test shortest side.
            flip_prob: horizontal flip probability.
            crop: use DETR's random-crop branch (with probability 0.5).
            crop_resize, crop_size: that branch's shortest sides and absolute crop size range.
            image_format: channel order of the output image, "BGR" (detectron2's convention,
                matching its BGR ``pixel_mean``) or "RGB"; the model must be told the same.
            skip_bad_records: skip and count bad records instead of raising.
            box_tolerance: pixels a box may extend outside the image (rounding in annotations).
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.is_train = is_train
        self.num_classes = int(num_classes)
        self.image_format = image_format
        self.skip_bad_records = skip_bad_records
        self.box_tolerance = float(box_tolerance)
        self.augmentation = build_detr_augmentation(
            is_train, min_sizes, max_size, test_size, flip_prob
        )
        # what the resizes need (a larger image is read reduced): test / multi-scale training
        # sides, and the crop branch's first resize (no long-side limit)
        if is_train:
            self.fit = [(max(min_sizes), max_size)]
            if crop:
                self.fit.append((max(crop_resize), float("inf")))
        else:
            self.fit = [(test_size, max_size)]
        self.augmentation_with_crop = None
        if is_train and crop:
            resize = [a for a in self.augmentation if isinstance(a, T.ResizeShortestEdge)]
            flips = [a for a in self.augmentation if not isinstance(a, T.ResizeShortestEdge)]
            self.augmentation_with_crop = flips + [
                T.ResizeShortestEdge(list(crop_resize), sample_style="choice"),
                T.RandomCrop("absolute_range", tuple(crop_size)),
                *resize,
            ]
        self.num_skipped = 0

    def _fail(self, record: dict, reason: str) -> None:
        msg = f"bad record image_id={record.get('image_id')!r} file={record.get('file_name')!r}: "
        msg += reason
        if not self.skip_bad_records:
            raise RecordError(msg)
        self.num_skipped += 1
        logger.warning(f"{msg} (skipped; {self.num_skipped} skipped so far)")

    def _check_annotations(self, record: dict, height: int, width: int) -> Optional[str]:
        tol = self.box_tolerance
        for i, ann in enumerate(record.get("annotations", [])):
            try:
                box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            except (KeyError, TypeError, ValueError, AssertionError) as e:
                return f"annotation {i}: malformed bbox ({e})"
            x0, y0, x1, y1 = (float(v) for v in box)
            if not all(np.isfinite([x0, y0, x1, y1])):
                return f"annotation {i}: non-finite bbox {ann['bbox']}"
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                return f"annotation {i}: bbox {ann['bbox']} has width or height <= 0"
            if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
                return f"annotation {i}: bbox {ann['bbox']} lies outside the {width}x{height} image"
            c = ann.get("category_id")
            if not isinstance(c, (int, np.integer)) or not 0 <= c < self.num_classes:
                return (
                    f"annotation {i}: unknown category id {c!r} "
                    f"(num_classes={self.num_classes}: ids are 0..{self.num_classes - 1})"
                )
        return None

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        """
        Returns:
            dict with ``image`` (3, H, W) uint8 tensor, ``height``/``width`` (original size) and,
            in training, ``instances`` (``gt_boxes`` XYXY absolute in the augmented image,
            ``gt_classes``); None for a skipped bad record.
        """
        record = copy.deepcopy(dataset_dict)
        file_name = record.get("file_name")
        if not file_name or not os.path.isfile(file_name):
            return self._fail(record, "image file does not exist")
        try:
            image, (h, w) = read_image_for_resize(file_name, self.image_format, self.fit)
        except Exception as e:  # PIL raises many types for corrupt files
            return self._fail(record, f"unreadable image ({type(e).__name__}: {e})")
        if ("height" in record and record["height"] != h) or (
            "width" in record and record["width"] != w
        ):
            return self._fail(
                record,
                f"image is {w}x{h} but the record says "
                f"{record.get('width')}x{record.get('height')}",
            )
        record.setdefault("height", h)
        record.setdefault("width", w)
        if self.is_train or "annotations" in record:
            reason = self._check_annotations(record, h, w)
            if reason is not None:
                return self._fail(record, reason)

        if self.augmentation_with_crop is not None and np.random.rand() > 0.5:
            augs = self.augmentation_with_crop
        else:
            augs = self.augmentation
        read_h, read_w = image.shape[:2]
        image, transforms = T.apply_transform_gens(augs, image)
        if (read_h, read_w) != (h, w):  # read reduced: boxes go from the full size to it first
            transforms = T.TransformList([T.ScaleTransform(h, w, read_h, read_w)]) + transforms
        image_shape = image.shape[:2]
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            record.pop("annotations", None)
            return record
        annos = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in record.pop("annotations", [])
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annos, image_shape)
        # Clip to the image, then drop boxes the crop made empty (degenerate).
        instances.gt_boxes.clip(image_shape)
        record["instances"] = utils.filter_empty_instances(instances, box_threshold=1e-5)
        return record

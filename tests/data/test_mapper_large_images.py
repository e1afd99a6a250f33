"""A very large image is read at a reduced size (issue 28): a 10000 x 10000 photo for an
800 x 1333 input must not need gigabytes. The reduced read gives the same output size (up to one
pixel of rounding) and boxes as the full read (boxes are annotated in the full image), respects
EXIF orientation, and leaves images no larger than the resizes need untouched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cqdino.data.mapper import DetrDatasetMapper, read_image, read_image_for_resize

ROOT = Path(__file__).resolve().parents[2]


def _photo(path, width, height, exif_orientation=None):
    """A smooth colour picture (so reduced and full reads agree up to resampling)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([255 * xx / width, 255 * yy / height, 128 + 0 * xx], -1).astype(np.uint8)
    image = Image.fromarray(rgb)
    if exif_orientation is None:
        image.save(path, quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, quality=90, exif=exif.tobytes())
    return str(path)


def _record(path, height, width):
    box = [0.1 * width, 0.2 * height, 0.5 * width, 0.3 * height]
    return {
        "file_name": path,
        "height": height,
        "width": width,
        "image_id": 1,
        "annotations": [{"bbox": box, "bbox_mode": 1, "category_id": 0}],
    }


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_reduced_read_matches_the_full_read(tmp_path, suffix):
    path = _photo(tmp_path / f"big{suffix}", 2400, 1600)
    mapper = DetrDatasetMapper(True, num_classes=1, min_sizes=(96, 128), max_size=200)
    image, full = read_image_for_resize(path, "BGR", mapper.fit)
    assert full == (1600, 2400)
    # JPEG: decoded at 1/8 (>= the 128-px short side); PNG: reduced by 12 (1600 / 128)
    assert image.shape[:2] == ((200, 300) if suffix == ".jpg" else (134, 200))
    for seed in range(4):
        np.random.seed(seed)
        reduced = mapper(_record(path, 1600, 2400))
        mapper_full = DetrDatasetMapper(True, num_classes=1, min_sizes=(96, 128), max_size=200)
        mapper_full.fit = None  # the full image, resized by the augmentation alone
        np.random.seed(seed)
        reference = mapper_full(_record(path, 1600, 2400))
        # the same size up to the rounding of the reduced size (one pixel)
        (_, h, w), (_, rh, rw) = reduced["image"].shape, reference["image"].shape
        assert abs(h - rh) <= 1 and abs(w - rw) <= 1
        pixels = reduced["image"].permute(1, 2, 0).numpy()
        pixels = np.asarray(Image.fromarray(pixels).resize((rw, rh), Image.BILINEAR), np.float32)
        diff = np.abs(pixels - reference["image"].permute(1, 2, 0).numpy()).mean()
        assert diff < 2.0, diff
        # boxes: the same place in the image (relative coordinates)
        np.testing.assert_allclose(
            reduced["instances"].gt_boxes.tensor.numpy() / [w, h, w, h],
            reference["instances"].gt_boxes.tensor.numpy() / [rw, rh, rw, rh],
            atol=2e-3,
        )


def test_reduced_read_applies_exif_orientation(tmp_path):
    # stored 600 wide x 400 high, EXIF 6: shown rotated, 400 wide x 600 high
    path = _photo(tmp_path / "rotated.jpg", 600, 400, exif_orientation=6)
    full = read_image(path, "RGB")
    image, size = read_image_for_resize(path, "RGB", [(50, 80)])
    assert size == full.shape[:2] == (600, 400)
    assert image.shape[:2] == (75, 50)  # 1/8, oriented
    small = np.asarray(Image.fromarray(full).resize((50, 75), Image.BOX), np.float32)
    assert np.abs(image.astype(np.float32) - small).mean() < 3.0


def test_images_the_resizes_need_whole_are_read_whole(tmp_path):
    path = _photo(tmp_path / "small.jpg", 300, 200)
    image, size = read_image_for_resize(path, "BGR", [(128, 200)])
    assert size == image.shape[:2] == (200, 300)
    np.testing.assert_array_equal(image, read_image(path, "BGR"))


def test_a_10000_pixel_photo_needs_little_memory(tmp_path):
    """The mapper's memory for a 10000 x 10000 JPEG, measured in a fresh process (the full
    read took 1.3 GB on top of the process before the fix)."""
    path = tmp_path / "huge.jpg"
    Image.radial_gradient("L").resize((10000, 10000)).save(path, quality=80)
    script = f"""
import json, resource
from cqdino.data.mapper import DetrDatasetMapper
mapper = DetrDatasetMapper(True, num_classes=1)
record = {json.dumps(_record(str(path), 10000, 10000))}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = mapper(record)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([list(out["image"].shape), (after - before) / 1024]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shape, grown_mb = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(shape[1:]) <= 1333 and min(shape[1:]) >= 480
    assert grown_mb < 150, f"the mapper's peak memory grew by {grown_mb:.0f} MB"

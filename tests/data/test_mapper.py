import copy

import numpy as np
import pytest
from PIL import Image

from cqdino.data import DetrDatasetMapper, RecordError, load_detection_json


@pytest.fixture(scope="module")
def coco8(shared_data):
    root = shared_data / "coco8"
    return load_detection_json(str(root / "annotations" / "coco8_train.json"), str(root))


def _xyxy(record):
    return np.array([[a[0], a[1], a[0] + a[2], a[1] + a[3]] for a in [x["bbox"] for x in record]])


def test_train_resize_and_boxes(coco8):
    mapper = DetrDatasetMapper(True, flip_prob=0.0, num_classes=80)
    np.random.seed(0)
    for rec in coco8:
        for _ in range(3):
            out = mapper(rec)
            _, h, w = out["image"].shape
            H, W = rec["height"], rec["width"]
            # Shortest side in 480..800 step 32 unless the 1333 cap on the long side binds.
            if max(h, w) < 1333:
                assert min(h, w) in range(480, 801, 32)
            assert max(h, w) <= 1333
            scale = np.array([w / W, h / H, w / W, h / H])
            expect = _xyxy(rec["annotations"]) * scale
            got = out["instances"].gt_boxes.tensor.numpy()
            np.testing.assert_allclose(got, expect, rtol=1e-3, atol=1.0)
            assert out["instances"].gt_classes.tolist() == [
                a["category_id"] for a in rec["annotations"]
            ]


def test_flip_mirrors_boxes(coco8):
    rec = coco8[0]
    size = dict(min_sizes=(rec["height"],), max_size=10000, num_classes=80)
    out = DetrDatasetMapper(True, flip_prob=1.0, **size)(rec)
    W = rec["width"]
    b = _xyxy(rec["annotations"])
    expect = np.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1)
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), expect, atol=1e-3)
    img = np.asarray(Image.open(rec["file_name"]).convert("RGB"))  # (H, W, 3) RGB
    # BGR by default (detectron2's convention): channels reversed
    np.testing.assert_array_equal(out["image"].numpy().transpose(1, 2, 0), img[:, ::-1, ::-1])
    rgb = DetrDatasetMapper(True, flip_prob=1.0, image_format="RGB", **size)(rec)
    np.testing.assert_array_equal(rgb["image"].numpy().transpose(1, 2, 0), img[:, ::-1])


def test_test_mode_and_crop_branch(coco8):
    out = DetrDatasetMapper(False, num_classes=80)(coco8[0])
    assert min(out["image"].shape[1:]) == 800 or max(out["image"].shape[1:]) == 1333
    assert "instances" not in out and "annotations" not in out
    mapper = DetrDatasetMapper(True, crop=True, num_classes=80)
    np.random.seed(1)
    cropped_any = False
    # Small boxes all over the image, so that random crops cut some of them away.
    grid = copy.deepcopy(coco8[0])
    H, W = grid["height"], grid["width"]
    grid["annotations"] = [
        dict(grid["annotations"][0], bbox=[x, y, 12.0, 12.0])
        for x in np.linspace(0, W - 13, 6).tolist()
        for y in np.linspace(0, H - 13, 6).tolist()
    ]
    for _ in range(8):
        for rec in coco8 + [grid]:
            inst = mapper(rec)["instances"]
            boxes = inst.gt_boxes.tensor
            h, w = inst.image_size
            # Degenerate (cropped-away) boxes are dropped; the rest lie in the image.
            assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and (
                (boxes[:, 3] - boxes[:, 1]) > 0
            ).all()
            assert (
                (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            )
            cropped_any |= len(inst) < len(rec["annotations"])
    assert cropped_any


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda r, p: r.update(file_name=str(p / "missing.jpg")), "does not exist"),
        (lambda r, p: r.update(file_name=_garbage(p)), "unreadable image"),
        (lambda r, p: r["annotations"][0].update(bbox=[10, 10, 0, 5]), "width or height <= 0"),
        (lambda r, p: r["annotations"][0].update(bbox=[600, 10, 100, 5]), "outside"),
        (lambda r, p: r["annotations"][0].update(category_id=80), "unknown category id 80"),
        (lambda r, p: r["annotations"][0].update(category_id=-1), "unknown category id -1"),
        (lambda r, p: r.update(height=r["height"] + 7), "record says"),
    ],
)
def test_bad_records(coco8, tmp_path, mutate, reason):
    rec = copy.deepcopy(coco8[0])
    mutate(rec, tmp_path)
    with pytest.raises(RecordError, match=reason) as e:
        DetrDatasetMapper(True, num_classes=80)(rec)
    assert f"image_id={rec['image_id']!r}" in str(e.value) and rec["file_name"] in str(e.value)
    skipper = DetrDatasetMapper(True, num_classes=80, skip_bad_records=True)
    assert skipper(rec) is None and skipper(rec) is None
    assert skipper.num_skipped == 2
    assert skipper(coco8[1]) is not None and skipper.num_skipped == 2


def _garbage(path):
    f = path / "broken.jpg"
    f.write_bytes(b"\xff\xd8 not really a jpeg")
    return str(f)


def test_num_classes_is_required_and_checked(coco8):
    with pytest.raises(TypeError, match="num_classes"):
        DetrDatasetMapper(True)
    for bad in (None, 0, "80", True, 2.0):
        with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
            DetrDatasetMapper(True, num_classes=bad)
    rec = copy.deepcopy(coco8[0])
    rec["annotations"][0]["category_id"] = 5  # valid for 80 classes, unknown for 5
    DetrDatasetMapper(True, num_classes=80)(copy.deepcopy(rec))
    with pytest.raises(RecordError, match=r"annotation 0: unknown category id 5 \(num_classes=5"):
        DetrDatasetMapper(False, num_classes=5)(rec)


@pytest.mark.parametrize("fmt", ["rgb", "L", "YUV-BT.601", None])
def test_image_format_is_validated(fmt):
    with pytest.raises(ValueError, match=r"image_format must be one of \('BGR', 'RGB'\)"):
        DetrDatasetMapper(True, num_classes=80, image_format=fmt)


def _sixteen_bit_pair(tmp_path, suffix):
    """A 16-bit grey image (values over the full 0..65535 range) and the same picture at 8 bit
    (the 16-bit values divided by 257: what a correct reader gives)."""
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    path16, path8 = tmp_path / f"grey16{suffix}", tmp_path / "grey8.png"
    Image.fromarray(ramp).save(path16)
    assert Image.open(path16).mode.startswith("I")  # really a 16-bit file
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(path8)
    return path16, path8


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_images_are_scaled_not_clipped(tmp_path, suffix):
    """16-bit grey PNG/TIFF: the training mapper and the inference tool read the picture, not
    an all-white image (PIL's convert("RGB") clips 16-bit values at 255)."""
    import importlib.util
    from pathlib import Path

    path16, path8 = _sixteen_bit_pair(tmp_path, suffix)
    mapper = DetrDatasetMapper(False, num_classes=1, test_size=48, max_size=64)
    got = mapper({"file_name": str(path16), "height": 48, "width": 64})["image"]
    want = mapper({"file_name": str(path8), "height": 48, "width": 64})["image"]
    assert (got.int() - want.int()).abs().max() <= 1
    assert got.float().mean() < 200  # the ramp's mean is ~127; clipping gives ~255

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("demo_tool", root / "projects" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    got, want = demo.read_input(str(path16)), demo.read_input(str(path8))
    assert got.shape == want.shape == (48, 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

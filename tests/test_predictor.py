"""``cqdino.predictor.Predictor`` on each format (a training checkpoint + config, the
``torch.export`` program, the ONNX model; the AOTInductor package in a slow test) of a tiny
CQ-DINO: the same detections as the eager detectron2 path (detectron2's own resize of the
test mapper, ``model([{"image", "height", "width"}])``) on images given as arrays, PIL images
and paths, in a batch of different sizes; the class names travel in the exported files'
metadata; ``projects/demo.py --model FILE`` draws them."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from PIL import Image

from cqdino import _ext
from cqdino.export import detections_match

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"thing {i}" for i in range(6)]
TEST_SIZE, TEST_MAX = 80, 120
CONFIG = f"""
from detectron2.config import LazyCall as L
from tests.modeling.cqdino_utils import tiny_cqdino

model = L(tiny_cqdino)(num_categories=6, topk=4, num_queries=30, layers=1, width=16,
                       test_topk=6)
dataloader = dict(test=dict(mapper=dict(test_size={TEST_SIZE}, max_size={TEST_MAX})))
train = dict(init_checkpoint="")
"""
SIZES = [(60, 90), (100, 70), (64, 64)]  # (h, w) of the test images, resized to 80 short side

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="cqdino._C not built")


def _model():
    from tests.modeling.cqdino_utils import tiny_cqdino

    torch.manual_seed(0)
    return tiny_cqdino(num_categories=6, topk=4, num_queries=30, layers=1, width=16, test_topk=6)


def _images():
    gen = np.random.default_rng(0)
    images = []
    for h, w in SIZES:
        im = gen.integers(0, 60, (h, w, 3), dtype=np.uint8)
        im[h // 4 : h // 2, w // 5 : w // 2] = (200, 40, 40)  # a few flat rectangles
        im[h // 2 :, w // 2 :] = (30, 180, 220)
        images.append(im)
    return images  # BGR


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The checkpoint (with class names, as train_net.py saves it), its config, and the
    .pt2 / .onnx exports with the metadata tools/export.py writes."""
    from detectron2.config import LazyConfig

    from cqdino.export import export_onnx, export_program, save_program
    from cqdino.predictor import deployment_info

    folder = tmp_path_factory.mktemp("predictor")
    config = folder / "tiny.py"
    config.write_text(CONFIG)
    model = _model().eval()
    ckpt = folder / "model.pth"
    torch.save({"model": model.state_dict(), "class_names": NAMES}, ckpt)
    program, info = export_program(model, max_size=192, max_batch=4)
    info.update(deployment_info(LazyConfig.load(str(config)), model, str(ckpt)))
    save_program(program, str(folder / "m.pt2"), info)
    export_onnx(program, str(folder / "m.onnx"), info)
    return {"config": config, "ckpt": ckpt, "model": model, "program": program, "info": info}


def _eager(model, images):
    """detectron2's inference path: its ResizeShortestEdge, model([dicts]) with the image's
    size, boxes in the image's pixels."""
    resize = T.ResizeShortestEdge(TEST_SIZE, TEST_MAX)
    inputs = []
    for im in images:
        resized = resize.get_transform(im).apply_image(im)
        chw = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        inputs.append({"image": chw, "height": im.shape[0], "width": im.shape[1]})
    with torch.no_grad():
        out = model(inputs)
    return [(i.pred_boxes.tensor, i.scores, i.pred_classes) for i in (r["instances"] for r in out)]


def _check(detections, expected, images):
    actual = [
        (torch.from_numpy(d.boxes), torch.from_numpy(d.scores), torch.from_numpy(d.classes))
        for d in detections
    ]
    sizes = torch.tensor([im.shape[:2] for im in images])
    assert detections_match(expected, actual, sizes) == []
    for d in detections:
        assert len(d) > 10 and d.names == [NAMES[c] for c in d.classes.tolist()]
        assert np.all(np.diff(d.scores) <= 0)


def test_resize_shape_is_detectron2s():
    from cqdino.predictor import resize_shape

    for h, w, short, longest in [
        (60, 90, 80, 120),
        (100, 70, 80, 120),
        (480, 640, 800, 1333),
        (3000, 200, 800, 1333),
        (799, 1333, 800, 1333),
        (5, 5, 7, 9),
    ]:
        expected = T.ResizeShortestEdge.get_output_shape(h, w, short, longest)
        assert resize_shape(h, w, short, longest) == tuple(expected)


@pytest.fixture(scope="module")
def predictors(files):
    """One Predictor per format (loading a .pt2 takes seconds: load each once)."""
    from cqdino.predictor import Predictor

    folder = files["ckpt"].parent
    out = {
        "checkpoint": Predictor(str(files["ckpt"]), config_file=str(files["config"]), threads=1),
        "pt2": Predictor(str(folder / "m.pt2"), threads=1),
    }
    try:
        import onnxruntime  # noqa: F401

        out["onnx"] = Predictor(str(folder / "m.onnx"), threads=1)
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("fmt", ["checkpoint", "pt2", "onnx"])
def test_predictor_reproduces_eager(files, predictors, fmt):
    if fmt not in predictors:
        pytest.skip("onnxruntime not installed")
    predictor = predictors[fmt]
    assert predictor.info["runtime"] == {"checkpoint": "eager", "pt2": "export"}.get(
        fmt, "onnxruntime"
    )
    assert predictor.class_names == NAMES  # from the checkpoint, through the metadata
    assert (predictor.test_size, predictor.test_max_size) == (TEST_SIZE, TEST_MAX)
    images = _images()
    expected = _eager(files["model"], images)
    _check(predictor(images), expected, images)  # one batch of 3 sizes
    single = predictor(images[0])  # one image, not a list
    _check([single], expected[:1], images[:1])


def test_predictor_reads_paths_and_pil_images(predictors, tmp_path):
    predictor = predictors["checkpoint"]
    images = _images()
    path = tmp_path / "a.png"
    Image.fromarray(images[1][:, :, ::-1]).save(path)  # PNG holds RGB
    pil = Image.fromarray(images[2][:, :, ::-1])
    out = predictor([str(path), pil, images[0]])
    ref = predictor([images[1], images[2], images[0]])
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.classes, b.classes)
    predictor.array_format = "RGB"
    try:
        np.testing.assert_array_equal(predictor(images[0][:, :, ::-1]).boxes, ref[2].boxes)
    finally:
        predictor.array_format = "BGR"
    kept = predictor(images, confidence=0.2)
    assert all(np.all(d.scores >= 0.2) and len(d) <= len(r) for d, r in zip(kept, ref))


def test_predictor_bad_inputs(files, predictors, tmp_path):
    from cqdino.predictor import Predictor

    with pytest.raises(FileNotFoundError, match="no such file"):
        Predictor(str(tmp_path / "missing.onnx"))
    with pytest.raises(ValueError, match="config_file"):
        Predictor(str(files["ckpt"]))
    other = tmp_path / "x.pt2"
    other.write_text("not a zip")
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        Predictor(str(other))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictors["checkpoint"](np.zeros((10, 10), np.uint8))


def test_demo_draws_from_an_exported_file(files, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.syspath_prepend(str(ROOT / "projects"))
    sys.modules.pop("demo", None)
    import demo

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, im in enumerate(_images()):
        Image.fromarray(im[:, :, ::-1]).save(inputs / f"im{i}.png")
    out = tmp_path / "out"
    model = files["ckpt"].parent / "m.onnx"
    code = demo.main(
        ["--model", str(model), "--input", str(inputs), "--output", str(out), "--confidence", "0.0"]
    )
    assert code == 0
    result = json.loads((out / "detections.json").read_text())
    assert result["checkpoint"] == str(model) and len(result["images"]) == 3
    for record in result["images"]:
        assert (out / record["output"]).is_file()
        assert record["detections"]
        assert {d["category_name"] for d in record["detections"]} <= set(NAMES)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CQDINO_TEST_AOTI"),
    reason="an AOTInductor compile takes minutes (set CQDINO_TEST_AOTI=1 to run it)",
)
def test_predictor_aoti_package(files, tmp_path):
    """AOTInductor compile (minutes on a small CPU): the package carries the metadata."""
    from cqdino.export import aoti_package
    from cqdino.predictor import Predictor

    path = tmp_path / "m_aoti.pt2"
    aoti_package(files["program"], str(path), info=files["info"])
    predictor = Predictor(str(path), threads=1)
    assert predictor.class_names == NAMES
    images = _images()
    _check(predictor(images), _eager(files["model"], images), images)

"""projects/demo.py on a 2-iteration tiny CQ-DINO: drawn images of the inputs' size, one
detections.json with the documented structure, unreadable inputs reported and skipped, the
confidence threshold, the same detections as the evaluation pipeline (test loader + model), and
exit status 1 when nothing could be read."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from PIL import Image

from .conftest import ROOT, TINY_CATEGORIES, TINY_OVERRIDES

pytestmark = pytest.mark.slow

CONFIG = ["--config-file", str(ROOT / "configs" / "demo.py")]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


def run_demo(datasets: Path, ckpt: Path, inputs, output: Path, confidence: float):
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "projects" / "demo.py"), *CONFIG]
    cmd += ["--input", *map(str, inputs), "--output", str(output)]
    cmd += ["--confidence", str(confidence), *TINY_OVERRIDES, f"train.init_checkpoint={ckpt}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _class_names(datasets: Path):
    path = datasets / "synthetic_vocab" / "category_names.txt"
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_demo_tool(tiny_datasets, checkpoint, tmp_path):
    val = sorted((tiny_datasets / "synthetic_vocab" / "images" / "val").glob("*.jpg"))
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(val[2], folder / val[0].name)  # same stem as an explicit input
    Image.open(val[3]).save(folder / "other.png")
    (folder / "notes.txt").write_text("not an image")  # not an image extension: ignored
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 20)
    missing = tmp_path / "missing.jpg"
    inputs = [val[0], val[1], folder, corrupt, missing]
    out = tmp_path / "out"
    proc = run_demo(tiny_datasets, checkpoint, inputs, out, confidence=0.0)
    assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads((out / "detections.json").read_text())
    assert set(result) >= {"images", "errors"}
    expected = [val[0], val[1], folder / val[0].name, folder / "other.png"]
    assert [im["file"] for im in result["images"]] == list(map(str, expected))
    outputs = [im["output"] for im in result["images"]]
    assert len(set(outputs)) == 4 and outputs[:2] == [f"{val[0].stem}.jpg", f"{val[1].stem}.jpg"]
    assert sorted(p.name for p in out.iterdir()) == sorted(outputs + ["detections.json"])

    names = _class_names(tiny_datasets)
    assert len(names) == TINY_CATEGORIES
    for im, src in zip(result["images"], expected):
        with Image.open(src) as s:
            assert (im["width"], im["height"]) == s.size
        with Image.open(out / im["output"]) as drawn:
            assert drawn.size == s.size and drawn.format == "JPEG"
        dets = im["detections"]
        assert dets, "confidence 0 keeps every detection the model returns"
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True)
        for d in dets:
            assert set(d) == {"bbox", "score", "category_id", "category_name"}
            x0, y0, x1, y1 = d["bbox"]
            assert -0.01 <= x0 <= x1 <= im["width"] + 0.01
            assert -0.01 <= y0 <= y1 <= im["height"] + 0.01
            assert 0.0 <= d["score"] <= 1.0
            assert 0 <= d["category_id"] < TINY_CATEGORIES
            assert d["category_name"] == names[d["category_id"]]

    errors = {e["file"]: e["reason"] for e in result["errors"]}
    assert set(errors) == {str(corrupt), str(missing)}
    assert "no such file" in errors[str(missing)]
    assert "not a readable image" in errors[str(corrupt)]
    for path in (corrupt, missing):
        assert f"skipping {path}" in proc.stderr
    assert not list(out.glob(".*.tmp"))

    # the threshold keeps exactly the detections scoring at least --confidence
    first = result["images"][0]["detections"]
    # midway between two scores far enough apart that the JSON's rounding cannot matter
    k = next(
        i
        for i in range(len(first) // 2, len(first) - 1)
        if first[i]["score"] - first[i + 1]["score"] > 1e-4
    )
    threshold = (first[k]["score"] + first[k + 1]["score"]) / 2
    out2 = tmp_path / "out2"
    proc = run_demo(tiny_datasets, checkpoint, [val[0]], out2, confidence=threshold)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kept = json.loads((out2 / "detections.json").read_text())["images"][0]["detections"]
    assert kept and kept == [d for d in first if d["score"] >= threshold]
    assert len(kept) == k + 1 < len(first)


def test_demo_tool_nothing_readable(tiny_datasets, checkpoint, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = run_demo(tiny_datasets, checkpoint, [corrupt, tmp_path / "missing"], out, 0.3)
    assert proc.returncode == 1
    assert "no image was processed" in proc.stderr
    result = json.loads((out / "detections.json").read_text())
    assert result["images"] == [] and len(result["errors"]) == 2


def test_demo_tool_matches_evaluation(synthetic_vocab, checkpoint, tmp_path):
    """The tool feeds the model as evaluation does (channel order, test resize, output size):
    its detections of a val image are those of ``dataloader.test`` + the checkpoint's model."""
    image = sorted((synthetic_vocab / "synthetic_vocab" / "images" / "val").glob("*.jpg"))[0]
    proc = run_demo(synthetic_vocab, checkpoint, [image], tmp_path / "out", confidence=0.0)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tool = json.loads((tmp_path / "out" / "detections.json").read_text())["images"][0]

    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(str(ROOT / "configs" / "demo.py")), TINY_OVERRIDES
    )
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(str(checkpoint))
    model.eval()
    batch = next(b for b in instantiate(cfg.dataloader.test) if b[0]["file_name"] == str(image))
    assert tuple(batch[0]["image"].shape[1:]) != (tool["height"], tool["width"])  # resized
    with torch.no_grad():
        inst = model(batch)[0]["instances"]
    reference = [
        (float(s), int(c), b)
        for s, c, b in zip(inst.scores, inst.pred_classes, inst.pred_boxes.tensor.tolist())
    ]
    # every (query, category) pair is returned (Q x K <= 300), so the two lists hold the same
    # detections; match each by class and box (near-equal scores may swap places)
    assert len(tool["detections"]) == len(reference) > 0
    for det in tool["detections"]:
        same_class = [r for r in reference if r[1] == det["category_id"]]
        dist, score = min(
            (max(abs(a - b) for a, b in zip(det["bbox"], r[2])), r[0]) for r in same_class
        )
        assert dist < 0.05 and score == pytest.approx(det["score"], abs=1e-4), det


def test_overrides_after_input_are_overrides(tmp_path, monkeypatch):
    """``--input a.jpg train.x=1``: argparse puts the override into --input; the tool moves
    ``key=value`` items that are not existing files to the overrides."""
    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "projects" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.chdir(tmp_path)
    odd = "a=b.jpg"  # an existing file whose name looks like an override stays an input
    Path(odd).write_bytes(b"")
    args = demo.parse_args(
        ["--config-file", "c.py", "--input", "x.jpg", odd, "train.init_checkpoint=m.pth"]
        + ["--output", "o", "model.x=1"]
    )
    assert args.input == ["x.jpg", odd]
    assert args.opts == ["train.init_checkpoint=m.pth", "model.x=1"]
    with pytest.raises(SystemExit):
        demo.parse_args(
            ["--config-file", "c.py", "--input", "a.jpg", "--output", "o"] + ["--confidence", "1.5"]
        )


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_error(proc) -> str:
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


def test_output_folder_of_the_inputs_is_refused(tiny_datasets, checkpoint, tmp_path):
    """--input DIR --output DIR would draw over the input images: refused, inputs unchanged."""
    images = tmp_path / "images"
    shutil.copytree(tiny_datasets / "synthetic_vocab" / "images" / "val", images)
    before = _digests(images)
    proc = run_demo(tiny_datasets, checkpoint, [images], images, confidence=0.3)
    assert proc.returncode == 1
    assert "--output" in _one_error(proc) and "choose another --output" in _one_error(proc)
    assert _digests(images) == before


def test_output_that_is_a_file_is_refused_before_loading(tiny_datasets, checkpoint, tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    image = sorted((tiny_datasets / "synthetic_vocab" / "images" / "val").glob("*.jpg"))[0]
    proc = run_demo(tiny_datasets, checkpoint, [image], target, confidence=0.3)
    assert proc.returncode == 1 and "is a file" in _one_error(proc)
    assert "category names" not in proc.stderr  # stopped before the model was built
    assert target.read_text() == "keep me"


def test_checkpoint_of_another_config_is_refused(tiny_datasets, checkpoint, tmp_path):
    image = sorted((tiny_datasets / "synthetic_vocab" / "images" / "val").glob("*.jpg"))[0]
    env = {**os.environ, "DETECTRON2_DATASETS": str(tiny_datasets), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "projects" / "demo.py"), *CONFIG, "--input", str(image)]
    cmd += [
        "--output",
        str(tmp_path / "out"),
        *TINY_OVERRIDES,
        f"train.init_checkpoint={checkpoint}",
    ]
    cmd += ["model.transformer.num_queries=30"]  # another model than the checkpoint's
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "does not fit the model of this config" in _one_error(proc)
    assert not (tmp_path / "out").exists()


def test_class_names_come_from_the_checkpoint(tiny_datasets, checkpoint, tmp_path):
    """Another vocabulary registered now (same size, other names) does not rename the
    trained model's classes: the names saved with the checkpoint are used, and said so."""
    other = tmp_path / "other"
    cmd = [sys.executable, "-m", "cqdino.data.synthetic", "--out", str(other / "synthetic_vocab")]
    cmd += [f"--num-categories={TINY_CATEGORIES}", "--num-train-images=1", "--num-val-images=1"]
    cmd += ["--image-size", "64", "80", "--seed", "5"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    assert _class_names(other) != _class_names(tiny_datasets)
    image = sorted((tiny_datasets / "synthetic_vocab" / "images" / "val").glob("*.jpg"))[0]
    proc = run_demo(other, checkpoint, [image], tmp_path / "out", confidence=0.0)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert result["class_names_source"] == f"the checkpoint {checkpoint}"
    names = _class_names(tiny_datasets)
    dets = result["images"][0]["detections"]
    assert dets and all(d["category_name"] == names[d["category_id"]] for d in dets)


def test_no_dataset_is_generated_where_the_tool_runs(checkpoint, tmp_path):
    """Run from another folder without $DETECTRON2_DATASETS: one line saying what to set, and
    no demo dataset generated under the current folder."""
    image = tmp_path / "image.jpg"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(image)
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    cmd = [sys.executable, str(ROOT / "projects" / "demo.py"), *CONFIG, "--input", str(image)]
    cmd += [
        "--output",
        str(tmp_path / "out"),
        *TINY_OVERRIDES,
        f"train.init_checkpoint={checkpoint}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "DETECTRON2_DATASETS" in _one_error(proc)
    assert not (tmp_path / "datasets").exists()

"""Deployable inference (``cqdino.export``, ``tools/export.py``): the ``torch.export`` program
and the ONNX model of tiny DINO / CQ-DINO detectors reproduce the eager model's detections
(``model([dicts])``, the detectron2 path: per-image unpadded inputs, Instances out) on batches
of images of different sizes and batch sizes; the program holds our custom ops, the ONNX model
only standard operators; the tool rejects bad inputs with one message before any slow work.

Tolerances (issue 19): boxes within 1e-3 of the image size, scores within 1e-4, the same
classes for the top detections.
"""

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from cqdino import _ext
from cqdino.engine import load_weights_strict
from cqdino.export import (
    export_onnx,
    export_program,
    load_program,
    pad_images,
    save_program,
)
from cqdino.modeling import NameWordHead
from tests.modeling.cqdino_utils import tiny_cqdino
from tests.modeling.utils import tiny_dino

ROOT = Path(__file__).resolve().parents[1]
TOP = 20  # detections whose classes must agree
TIE = 1e-5  # scores closer than this may come in either order
# several batches: batch sizes 1-3, padded sizes from the minimum up, images smaller than the
# padded batch (h, w)
BATCHES = [
    [(96, 128)],
    [(128, 96), (70, 120), (100, 33)],
    [(160, 224), (224, 150)],
]

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="cqdino._C not built")


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "dino":
        model = tiny_dino(num_queries=40, layers=1, embed_dim=64, ffn_dim=128, width=16)
    else:
        model = tiny_cqdino(
            num_queries=40, layers=1, width=16, num_categories=12, topk=6, test_topk=9
        )
    if kind == "cqdino_words":  # + word scoring at inference (the demo's NameWordHead)
        names = [
            f"{c} {s}" for c in ("red", "blue", "green") for s in ("star", "ring", "cross", "arrow")
        ]
        model.word_head = NameWordHead(names, model.transformer.embed_dim)
        model.word_score_weight = 1.0
    return model.eval()


@pytest.fixture(scope="module", params=["dino", "cqdino", "cqdino_words"])
def exported(request, tmp_path_factory):
    model = _tiny(request.param)
    program, info = export_program(model, max_size=512, max_batch=8)
    path = tmp_path_factory.mktemp("export") / f"{request.param}.pt2"
    save_program(program, str(path), info)
    return request.param, model, program, info, path


def _eager(model, images, sizes):
    with torch.no_grad():
        out = model([{"image": im} for im in images])
    return [r["instances"] for r in out]


def _batch(specs, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=gen) * 255 for h, w in specs]


def _assert_same_detections(instances, boxes, scores, classes, specs):
    """Scores rank by rank within 1e-4; every eager detection (box within 1e-3 of the image
    size; class, for the top ``TOP``) at its rank, or at a rank whose score ties with it
    (within TIE: untrained models score many pairs almost alike, and the order of ties is
    not defined)."""
    for i, (inst, (h, w)) in enumerate(zip(instances, specs)):
        n = len(inst)
        assert n > TOP
        assert scores.shape[1] >= n  # eager drops boxes empty after clipping, never adds
        torch.testing.assert_close(scores[i, :n], inst.scores, atol=1e-4, rtol=0)
        box_err = (boxes[i, :n, None] - inst.pred_boxes.tensor[None]).abs().amax(-1)  # (n, n)
        same = box_err <= 1e-3 * max(h, w)
        same[:, :TOP] &= classes[i, :n, None] == inst.pred_classes[None, :TOP]
        tied = (scores[i, :n, None] - inst.scores[None]).abs() <= TIE
        found = (same & tied).any(0)
        assert found.all(), (i, (~found).nonzero().flatten()[:5].tolist())


def test_exported_program_reproduces_eager(exported):
    kind, model, _, info, path = exported
    program = load_program(str(path))  # the saved file, loaded without the model's code
    targets = {str(n.target) for n in program.graph.nodes}
    assert "cqdino.ms_deform_attn_forward.default" in targets
    if kind != "dino":
        assert "cqdino.topk_category_gather.default" in targets
    assert info["min_size"] <= 96 and info["max_size"] == 512
    run = program.module()
    for seed, specs in enumerate(BATCHES):
        images = _batch(specs, seed)
        batch, sizes = pad_images(images, info["size_divisibility"])
        with torch.no_grad():
            boxes, scores, classes = run(batch, sizes)
        assert boxes.shape == (len(specs), info["detections_per_image"], 4)
        _assert_same_detections(_eager(model, images, sizes), boxes, scores, classes, specs)


def test_exported_program_rejects_sizes_outside_its_range(exported):
    _, _, program, info, _ = exported
    d = info["size_divisibility"]
    run = program.module()
    too_big = torch.zeros(1, 3, info["max_size"] + d, info["min_size"])
    with pytest.raises(Exception, match=r"(?i)range|constraint|guard|expected"):
        run(too_big, torch.tensor([[info["max_size"], info["min_size"]]]))


def test_onnx_model_reproduces_eager(exported, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    kind, model, program, info, _ = exported
    path = tmp_path / f"{kind}.onnx"
    export_onnx(program, str(path), info)
    proto = onnx.load(str(path))
    # standard operators only, opset >= 16 (GridSample)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 16
    ops = [n.op_type for n in proto.graph.node]
    # 2 deformable attentions (1 encoder + 1 decoder layer) x 4 levels
    assert ops.count("GridSample") == 2 * 4
    assert "TopK" in ops
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for seed, specs in enumerate(BATCHES):
        images = _batch(specs, seed + 10)
        batch, sizes = pad_images(images, info["size_divisibility"])
        out = session.run(None, {"images": batch.numpy(), "image_sizes": sizes.numpy()})
        boxes, scores, classes = (torch.from_numpy(o) for o in out)
        _assert_same_detections(_eager(model, images, sizes), boxes, scores, classes, specs)


# --- the tool ------------------------------------------------------------------------------

TINY_CONFIG = """
from detectron2.config import LazyCall as L
from tests.modeling.utils import tiny_dino

model = L(tiny_dino)(num_classes={classes}, num_queries=40, layers=1, embed_dim=64, ffn_dim=128,
                     width=16)
train = dict(init_checkpoint="")
"""


@pytest.fixture()
def tool(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("export", None)
    import export as tool_module

    config = tmp_path / "tiny.py"
    config.write_text(TINY_CONFIG.format(classes=5))
    other = tmp_path / "tiny7.py"
    other.write_text(TINY_CONFIG.format(classes=7))
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": tiny_dino(5, 40, 1, 64, 128, width=16).state_dict()}, ckpt)
    return tool_module, config, other, ckpt


def _run_tool(tool_module, caplog, args):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="cqdino.export"):
        code = tool_module.main(args)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return code, errors


def test_tool_bad_inputs_give_one_message(tool, tmp_path, caplog):
    tool_module, config, other, ckpt = tool
    out = str(tmp_path / "m.pt2")
    base = ["--config-file", str(config), "--format", "torch", "--output", out]
    cases = {
        "no such file": base + [f"train.init_checkpoint={tmp_path / 'missing.pth'}"],
        "no train.init_checkpoint": base,
        "does not fit the model of this config": [
            "--config-file",
            str(other),
            "--format",
            "torch",
            "--output",
            out,
            f"train.init_checkpoint={ckpt}",
        ],
        "does not exist": [
            "--config-file",
            str(config),
            "--format",
            "torch",
            "--output",
            str(tmp_path / "nowhere" / "m.pt2"),
            f"train.init_checkpoint={ckpt}",
        ],
        "expected a .onnx file": [
            "--config-file",
            str(config),
            "--format",
            "onnx",
            "--output",
            out,
            f"train.init_checkpoint={ckpt}",
        ],
        "--config-file": [
            "--config-file",
            str(tmp_path / "nope.py"),
            "--format",
            "torch",
            "--output",
            out,
            f"train.init_checkpoint={ckpt}",
        ],
    }
    for expected, args in cases.items():
        code, errors = _run_tool(tool_module, caplog, args)
        assert code == 1, expected
        assert len(errors) == 1 and expected in errors[0], (expected, errors)
    # the mismatch message names the offending keys and shapes
    _, errors = _run_tool(tool_module, caplog, cases["does not fit the model of this config"])
    assert "class_head" in errors[0] and "[7, 64] in the model" in errors[0]
    # an existing output is kept unless --overwrite
    Path(out).write_text("keep me")
    code, errors = _run_tool(tool_module, caplog, base + [f"train.init_checkpoint={ckpt}"])
    assert code == 1 and "--overwrite" in errors[0]
    assert Path(out).read_text() == "keep me"
    assert not os.path.exists(tmp_path / "nowhere")


@pytest.mark.slow
def test_tool_writes_a_checked_program(tool, tmp_path, caplog):
    tool_module, config, _, ckpt = tool
    out = tmp_path / "m.pt2"
    out.write_text("old")
    args = ["--config-file", str(config), "--format", "torch", "--output", str(out)]
    args += ["--overwrite", "--max-size", "256", f"train.init_checkpoint={ckpt}"]
    code, errors = _run_tool(tool_module, caplog, args)
    assert code == 0 and not errors
    # the written program has the checkpoint's weights
    torch.manual_seed(1)
    model = tiny_dino(5, 40, 1, 64, 128, width=16).eval()
    load_weights_strict(model, str(ckpt))
    images = _batch([(100, 90)], 3)
    batch, sizes = pad_images(images, 32)
    with torch.no_grad():
        boxes, scores, classes = load_program(str(out)).module()(batch, sizes)
    _assert_same_detections(_eager(model, images, sizes), boxes, scores, classes, [(100, 90)])
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not list(tmp_path.glob(".m.pt2.*"))  # no temporary file left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

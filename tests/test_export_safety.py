"""``tools/export.py`` safety (issue 28): an output that is an input (the checkpoint, the
config, the other output; by path, symbolic link or hard link) is refused even with
``--overwrite``; ``--max-size`` below the model's minimum and bad ``--aoti`` paths give one line
naming the option; the self-check compares detections as matched sets (ties in either order,
boxes that eager drops as empty), not rank by rank. None of these tests traces a model."""

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from cqdino import export as export_lib
from cqdino.export import detections_match
from tests.modeling.utils import tiny_dino

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = """
from detectron2.config import LazyCall as L
from tests.modeling.utils import tiny_dino

model = L(tiny_dino)(num_classes=5, num_queries=40, layers=1, embed_dim=64, ffn_dim=128,
                     width=16)
train = dict(init_checkpoint="")
"""


class Traced(Exception):
    """Raised instead of tracing: the tool got past its checks."""


@pytest.fixture()
def tool(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("export", None)
    import export as tool_module

    def no_tracing(*args, **kwargs):
        raise Traced("export_program reached")

    monkeypatch.setattr(export_lib, "export_program", no_tracing)
    config = tmp_path / "tiny.py"
    config.write_text(TINY_CONFIG)
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": tiny_dino(5, 40, 1, 64, 128, width=16).state_dict()}, ckpt)
    return tool_module, config, ckpt


def _run(tool_module, caplog, args):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="cqdino.export"):
        code = tool_module.main([str(a) for a in args])
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_output_that_is_an_input_is_refused_even_with_overwrite(tool, tmp_path, caplog):
    tool_module, config, ckpt = tool
    original = ckpt.read_bytes()
    same_name = tmp_path / "weights.pt2"  # a checkpoint named like an export
    same_name.write_bytes(original)
    symlink = tmp_path / "link.pt2"
    symlink.symlink_to(ckpt)
    hardlink = tmp_path / "hard.pt2"
    os.link(ckpt, hardlink)
    cases = [  # (output, checkpoint, extra arguments, what the message names)
        (same_name, same_name, [], "train.init_checkpoint"),
        (symlink, ckpt, [], "train.init_checkpoint"),
        (hardlink, ckpt, [], "train.init_checkpoint"),
        (tmp_path / "m.pt2", ckpt, ["--aoti", symlink], "--aoti"),
        (tmp_path / "m.pt2", ckpt, ["--aoti", tmp_path / "m.pt2"], "--aoti"),
    ]
    for output, checkpoint, extra, named in cases:
        args = ["--config-file", config, "--format", "torch", "--output", output, "--overwrite"]
        code, errors = _run(
            tool_module, caplog, args + extra + [f"train.init_checkpoint={checkpoint}"]
        )
        assert code == 1, (output, extra)
        assert len(errors) == 1 and named in errors[0] and "same file" in errors[0], errors
    assert ckpt.read_bytes() == original and same_name.read_bytes() == original
    assert symlink.is_symlink() and os.path.samefile(hardlink, ckpt)


def test_output_next_to_the_inputs_is_accepted(tool, tmp_path, caplog):
    """The check refuses only the same file: a new output in the checkpoint's folder passes
    every check (and reaches the tracing, stubbed out here)."""
    tool_module, config, ckpt = tool
    args = ["--config-file", config, "--format", "torch", "--output", tmp_path / "m.pt2"]
    with pytest.raises(Traced):
        _run(tool_module, caplog, args + [f"train.init_checkpoint={ckpt}"])


def test_max_size_below_the_minimum_gives_one_line(tool, tmp_path, caplog):
    tool_module, config, ckpt = tool
    args = ["--config-file", config, "--format", "torch", "--output", tmp_path / "m.pt2"]
    for max_size in (32, 48):
        code, errors = _run(
            tool_module,
            caplog,
            args + ["--max-size", max_size, f"train.init_checkpoint={ckpt}"],
        )
        assert code == 1 and len(errors) == 1, errors
        assert f"--max-size {max_size}" in errors[0] and "smallest input" in errors[0]
    assert not (tmp_path / "m.pt2").exists()


def test_aoti_errors_name_aoti(tool, tmp_path, caplog):
    tool_module, config, ckpt = tool
    existing = tmp_path / "old_aoti.pt2"
    existing.write_text("keep me")
    base = ["--config-file", config, "--format", "torch", "--output", tmp_path / "m.pt2"]
    for aoti, expected in (
        (existing, "exists"),
        (tmp_path / "aoti.onnx", "expected a .pt2"),
        (tmp_path / "nowhere" / "a.pt2", "does not exist"),
    ):
        code, errors = _run(
            tool_module, caplog, base + ["--aoti", aoti, f"train.init_checkpoint={ckpt}"]
        )
        assert code == 1 and len(errors) == 1, errors
        assert errors[0].startswith(f"--aoti '{aoti}'") and expected in errors[0], errors
        assert "--output" not in errors[0]
    assert existing.read_text() == "keep me"


# --- the self-check's comparison ----------------------------------------------------------

SIZES = torch.tensor([[100, 200]])


def _detections(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=gen) * 50], 1)
    scores = torch.linspace(0.9, 0.4, n)
    classes = torch.arange(n) % 3
    return boxes, scores, classes


def test_detections_match_accepts_ties_in_either_order():
    """Two detections 2e-8 apart in score, of different classes, swapped by the runtime: the
    same set of detections (rank-by-rank comparison called this a class mismatch)."""
    boxes, scores, classes = _detections()
    scores[3] = scores[2] - 2e-8
    order = torch.tensor([0, 1, 3, 2, 4, 5])
    actual = (boxes[order] + 1e-4, scores[order], classes[order])
    assert classes[2] != classes[3]
    assert detections_match([(boxes, scores, classes)], [actual], SIZES) == []


def test_detections_match_skips_boxes_eager_drops_as_empty():
    """Eager drops a box that is empty after clipping (here at rank 2); the exported outputs
    keep it. The remaining ranks shift by one, still the same detections."""
    boxes, scores, classes = _detections()
    boxes[2, 2] = boxes[2, 0]  # zero width
    keep = torch.tensor([0, 1, 3, 4, 5])
    expected = (boxes[keep], scores[keep], classes[keep])
    assert detections_match([expected], [(boxes, scores, classes)], SIZES) == []


@pytest.mark.parametrize("fault", ["class", "score", "box", "missing", "extra"])
def test_detections_match_reports_real_differences(fault):
    boxes, scores, classes = _detections()
    expected = (boxes.clone(), scores.clone(), classes.clone())
    if fault == "class":
        classes[4] = (classes[4] + 1) % 3
    elif fault == "score":
        scores[1] += 1e-3
    elif fault == "box":
        boxes[5, 1] += 5.0  # 2.5e-2 of the longer side
    elif fault == "missing":  # the exported model lost a detection
        keep = torch.tensor([0, 1, 2, 4, 5])
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    else:  # a non-empty detection that eager does not have
        expected = tuple(t[:5] for t in expected)
    errors = detections_match([expected], [(boxes, scores, classes)], SIZES)
    assert errors and ("non-empty box" if fault == "extra" else "no twin") in errors[0], errors


def test_detections_match_is_one_to_one():
    """Two eager detections cannot share one exported twin."""
    boxes, scores, classes = _detections(2)
    boxes[1], scores[1], classes[1] = boxes[0], scores[0], classes[0]
    actual = (boxes[:1].repeat(2, 1), scores[:1].repeat(2), classes[:1].repeat(2))
    assert detections_match([(boxes, scores, classes)], [actual], SIZES) == []
    errors = detections_match([(boxes, scores, classes)], [tuple(t[:1] for t in actual)], SIZES)
    assert errors and "1 of 2 eager detections have no twin" in errors[-1]

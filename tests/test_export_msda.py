"""The gather form of multi-scale deformable attention (what the ONNX translation writes)
against the float64 reference (``grid_sample``): in PyTorch (``ms_deform_attn_gather``) and as
the ONNX graph in ONNX Runtime (float32). Off-map, border and non-finite sampling locations,
non-square levels, batch > 1."""

import pytest
import torch

from cqdino import _ext
from cqdino.layers.ms_deform_attn import ms_deform_attn_gather, ms_deform_attn_reference

SHAPES = [(6, 5), (3, 4), (2, 2), (1, 3)]  # (H_l, W_l), non-square, a 1-pixel-high level


def _inputs(B=2, Q=7, H=2, Dh=3, P=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S, L = int(shapes.prod(1).sum()), len(SHAPES)
    value = torch.randn(B, S, H, Dh, generator=gen, dtype=dtype)
    # mostly inside, some up to half a map outside each border
    loc = torch.rand(B, Q, H, L, P, 2, generator=gen, dtype=dtype) * 2.0 - 0.5
    loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 0.0])  # the corner
    loc[0, 0, 0, 1, 0] = torch.tensor([1.0, 1.0])
    loc[0, 1, 0, 0, 0, 0] = float("nan")
    b = B - 1
    loc[b, 2, 1, 2, 1, 1] = float("inf")
    loc[b, 3, 0, 3, 2] = torch.tensor([-float("inf"), 0.5])
    loc[b, 4, 1, 0, 0] = torch.tensor([1e30, -1e30])  # huge but finite
    weights = torch.rand(B, Q, H, L, P, generator=gen, dtype=dtype).softmax(-1)
    return value, shapes, starts, loc, weights


def test_gather_form_matches_the_float64_reference():
    args = _inputs()
    expected = ms_deform_attn_reference(*args)
    actual = ms_deform_attn_gather(*args)
    assert actual.shape == expected.shape == (2, 7, 2 * 3)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0)


def test_gather_form_float32_within_float_rounding():
    args = _inputs()
    expected = ms_deform_attn_reference(*args)
    args32 = [a.float() if a.is_floating_point() else a for a in args]
    torch.testing.assert_close(ms_deform_attn_gather(*args32).double(), expected, atol=1e-5, rtol=0)


class _Attn(torch.nn.Module):
    def forward(self, value, shapes, starts, loc, weights):
        return torch.ops.cqdino.ms_deform_attn_forward(value, shapes, starts, loc, weights, False)


@pytest.mark.skipif(not _ext.has_ext(), reason="cqdino._C not built")
@pytest.mark.parametrize("form", ["grid", "gather"])
def test_onnx_translation_matches_the_float64_reference(tmp_path, form):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from torch.export import Dim

    import cqdino.layers  # noqa: F401  (fake kernels of the ops)
    from cqdino.layers.onnx_translations import OPSET, translation_table

    args = _inputs(dtype=torch.float32)
    batch, queries = Dim("batch", min=1, max=8), Dim("queries", min=2, max=4096)
    dynamic = ({0: batch}, None, None, {0: batch, 1: queries}, {0: batch, 1: queries})
    program = torch.export.export(_Attn(), tuple(args), dynamic_shapes=dynamic, strict=False)
    path = tmp_path / "msda.onnx"
    torch.onnx.export(
        program,
        dynamo=True,
        custom_translation_table=translation_table(form),
        opset_version=OPSET,
        optimize=False,
    ).save(str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    if form == "grid":  # one GridSample per level
        assert ops.count("GridSample") == len(SHAPES)
    else:
        assert "GridSample" not in ops and ops.count("Gather") >= 4 * len(SHAPES)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for seed, (B, Q) in enumerate([(2, 7), (1, 30), (3, 5)]):
        args64 = _inputs(B=B, Q=Q, seed=seed + 1)
        feed = {
            n: (a.float() if a.is_floating_point() else a).numpy() for n, a in zip(names, args64)
        }
        (out,) = session.run(None, feed)
        expected = ms_deform_attn_reference(*args64)
        torch.testing.assert_close(torch.from_numpy(out).double(), expected, atol=1e-5, rtol=0)

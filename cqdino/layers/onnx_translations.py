"""ONNX translations of the ``cqdino::`` ops for ``torch.onnx.export(dynamo=True)``.

The exporter traces the model to an ``ExportedProgram`` that calls our compiled ops; these
onnxscript functions tell it how to write each op in standard ONNX operators, so the ONNX model
runs in any ONNX runtime without a custom-op library. They are passed as the exporter's
``custom_translation_table`` (:data:`CUSTOM_TRANSLATION_TABLE`); the PyTorch model is not
changed. Importing this module needs ``onnxscript`` (``pip install -e .[export]``); nothing in
:mod:`cqdino.layers` imports it.

What the ONNX graph computes (same semantics as the ops, different cost):

* ``cqdino::ms_deform_attn_forward`` -> by default (``"grid"``,
  :func:`ms_deform_attn_onnx`) per level a ``Slice`` of the value, one ``GridSample``
  (bilinear, zero padding, ``align_corners=0``) over all queries and points of the level,
  multiplied by the level's attention weights and summed over the points into the output
  before the next level, so only one level's samples ``[B*H, Dh, Q, P]`` exist at a time
  (~90 MB at one encoder layer of an 800 x 1344 image in fp32; the first translation stacked
  all levels and multiplied the stack: 4x that, twice). ``"gather"``
  (:func:`ms_deform_attn_onnx_gather`): a table of each pixel's 4 bilinear neighbours per level
  and one row ``Gather`` per sampling point, no ``GridSample``; correct, but slower and not
  lighter in ONNX Runtime 1.31 on the CPU (docs/export.md has the measurements). Non-finite
  sampling locations sample zeros in both, as in the op.
* ``cqdino::topk_category_gather`` (inference form, no ``force``) -> ``TopK`` (largest, sorted;
  ties: lower index first, as the op) + ``GatherND`` (per-image ``[B, C, D]`` embeddings) or
  ``Gather`` (shared ``[C, D]``). NaN scores: the op ranks them last; ONNX ``TopK`` does not
  define their order.
"""

from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op

__all__ = [
    "OPSET",
    "ms_deform_attn_onnx",
    "ms_deform_attn_onnx_gather",
    "topk_category_gather_onnx",
    "MSDA_FORMS",
    "translation_table",
    "CUSTOM_TRANSLATION_TABLE",
]

# GridSample (4-D) exists since opset 16; the functions below are written against opset 18,
# the exporter's default.
OPSET = 18


def ms_deform_attn_onnx(
    value: FLOAT,
    spatial_shapes: INT64,
    level_start_index: INT64,
    sampling_locations: FLOAT,
    attention_weights: FLOAT,
    deterministic: bool = False,
) -> FLOAT:
    """``value [B, S, H, Dh]``, level tables ``[L, 2]`` / ``[L]``, ``sampling_locations
    [B, Q, H, L, P, 2]`` (x, y in [0, 1]), ``attention_weights [B, Q, H, L, P]`` ->
    ``[B, Q, H * Dh]``. ``H``, ``Dh``, ``L``, ``P`` must be static (they are in our models);
    ``B``, ``S``, ``Q`` and the level sizes may be dynamic.

    The default form: per level a ``Slice`` of the value, one ``GridSample`` (bilinear, zero
    padding, ``align_corners=0``) of all queries and points of the level, ``[B * H, Dh, Q,
    P]``, multiplied by the level's attention weights and summed over the points into the
    ``[B * H, Dh, Q]`` output before the next level: the largest temporaries are one level's
    samples (the reference stacks all levels, ``[B * H, Dh, Q, L * P]``, and multiplies that
    whole tensor). Non-finite sampling locations sample zeros, as in the op."""
    _, _, num_heads, head_dim = value.shape
    num_levels, num_points = sampling_locations.shape[3], sampling_locations.shape[4]
    for name, dim in (("H", num_heads), ("Dh", head_dim), ("L", num_levels), ("P", num_points)):
        if not isinstance(dim, int):
            raise ValueError(f"ms_deform_attn ONNX translation: {name} must be static, got {dim}")
    one = op.Constant(value_ints=[1])
    # (B, S, H, Dh) -> (B, H, Dh, S): each level is then a contiguous slice of the last axis
    v = op.Transpose(value, perm=[0, 2, 3, 1])
    batch = op.Shape(value, start=0, end=1)
    queries = op.Shape(sampling_locations, start=1, end=2)
    # grid_sample coordinates; off-map points are clamped to +-3 (more than a pixel outside
    # any map: still zero) and non-finite ones sent to -3, as in the reference
    grid = op.Sub(
        op.Mul(sampling_locations, op.Constant(value_float=2.0)), op.Constant(value_float=1.0)
    )
    finite = op.Not(op.Or(op.IsNaN(grid), op.IsInf(grid)))
    finite = op.Cast(
        op.ReduceMin(op.Cast(finite, to=6), op.Constant(value_ints=[-1]), keepdims=1), to=9
    )
    minus3 = op.Constant(value_float=-3.0)
    grid = op.Where(finite, op.Clip(grid, minus3, op.Constant(value_float=3.0)), minus3)
    grid = op.Transpose(grid, perm=[0, 2, 3, 1, 4, 5])  # (B, H, L, Q, P, 2)
    attn = op.Transpose(attention_weights, perm=[0, 2, 3, 1, 4])  # (B, H, L, Q, P)
    bh = op.Mul(batch, op.Constant(value_ints=[num_heads]))
    out = None
    for lvl in range(num_levels):
        index = op.Constant(value_ints=[lvl])
        hw = op.Reshape(op.Gather(spatial_shapes, index, axis=0), op.Constant(value_ints=[2]))
        start = op.Gather(level_start_index, index, axis=0)  # (1,)
        end = op.Add(start, op.ReduceProd(hw, keepdims=1))
        v_l = op.Slice(v, start, end, op.Constant(value_ints=[3]))  # (B, H, Dh, H_l * W_l)
        v_l = op.Reshape(v_l, op.Concat(bh, op.Constant(value_ints=[head_dim]), hw, axis=0))
        g_l = op.Reshape(
            op.Gather(grid, index, axis=2),
            op.Concat(bh, queries, op.Constant(value_ints=[num_points, 2]), axis=0),
        )  # (B*H, Q, P, 2)
        a_l = op.Reshape(
            op.Gather(attn, index, axis=2),
            op.Concat(bh, one, queries, op.Constant(value_ints=[num_points]), axis=0),
        )  # (B*H, 1, Q, P)
        sampled = op.GridSample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=0)
        term = op.ReduceSum(op.Mul(sampled, a_l), op.Constant(value_ints=[-1]), keepdims=0)
        out = term if out is None else op.Add(out, term)  # (B*H, Dh, Q)
    out = op.Reshape(
        out, op.Concat(batch, op.Constant(value_ints=[num_heads * head_dim]), queries, axis=0)
    )
    return op.Transpose(out, perm=[0, 2, 1])  # (B, Q, H * Dh)


def ms_deform_attn_onnx_gather(
    value: FLOAT,
    spatial_shapes: INT64,
    level_start_index: INT64,
    sampling_locations: FLOAT,
    attention_weights: FLOAT,
    deterministic: bool = False,
) -> FLOAT:
    """``value [B, S, H, Dh]``, level tables ``[L, 2]`` / ``[L]``, ``sampling_locations
    [B, Q, H, L, P, 2]`` (x, y in [0, 1]), ``attention_weights [B, Q, H, L, P]`` ->
    ``[B, Q, H * Dh]``. ``H``, ``Dh``, ``L``, ``P`` must be static (they are in our models);
    ``B``, ``S``, ``Q`` and the level sizes may be dynamic.

    The gather form, step for step as
    :func:`cqdino.layers.ms_deform_attn.ms_deform_attn_gather` (which documents it): per level
    a zero-padded table of the 4 bilinear neighbours of every pixel and head, then per
    sampling point one row ``Gather``, the weights' ``Mul`` and a ``ReduceSum`` over the 4
    neighbours into the ``[B, Q, H, Dh]`` output."""
    _, _, num_heads, head_dim = value.shape
    num_levels, num_points = sampling_locations.shape[3], sampling_locations.shape[4]
    for name, dim in (("H", num_heads), ("Dh", head_dim), ("L", num_levels), ("P", num_points)):
        if not isinstance(dim, int):
            raise ValueError(f"ms_deform_attn ONNX translation: {name} must be static, got {dim}")
    channels = num_heads * head_dim
    one_f = op.Constant(value_float=1.0)
    half_f = op.Constant(value_float=0.5)
    minus1 = op.Constant(value_float=-1.0)
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    two_i = op.Constant(value_int=2)
    heads = op.Constant(value_int=num_heads)
    batch = op.Shape(value, start=0, end=1)  # (1,)
    batch_s = op.Squeeze(batch)
    queries = op.Shape(sampling_locations, start=1, end=2)
    # (b, head) parts of a row index: (B, 1, 1, 1) and (1, 1, H, 1)
    b_index = op.Reshape(op.Range(zero_i, batch_s, one_i), op.Constant(value_ints=[-1, 1, 1, 1]))
    h_index = op.Constant(value_ints=list(range(num_heads)))
    h_index = op.Reshape(h_index, op.Constant(value_ints=[1, 1, num_heads, 1]))
    finite = op.Not(op.Or(op.IsNaN(sampling_locations), op.IsInf(sampling_locations)))
    finite = op.Cast(
        op.ReduceMin(op.Cast(finite, to=6), op.Constant(value_ints=[-1]), keepdims=0), to=9
    )  # (B, Q, H, L, P)
    loc = op.Clip(sampling_locations, minus1, op.Constant(value_float=2.0))
    ends = op.Constant(value_ints=[-1, -1])
    starts1 = op.Constant(value_ints=[1, 1])
    big = op.Constant(value_ints=[1 << 62, 1 << 62])
    axes12 = op.Constant(value_ints=[1, 2])
    out = None
    for lvl in range(num_levels):
        index = op.Constant(value_int=lvl)
        hw = op.Gather(spatial_shapes, index, axis=0)  # (2,)
        h_l = op.Gather(hw, zero_i, axis=0)  # scalar int64
        w_l = op.Gather(hw, one_i, axis=0)
        start = op.Gather(level_start_index, op.Constant(value_ints=[lvl]), axis=0)  # (1,)
        end = op.Add(start, op.ReduceProd(hw, keepdims=1))
        v = op.Slice(value, start, end, op.Constant(value_ints=[1]))  # (B, h*w, H, Dh)
        v = op.Reshape(v, op.Concat(batch, hw, op.Constant(value_ints=[channels]), axis=0))
        v = op.Pad(v, op.Constant(value_ints=[0, 1, 1, 0, 0, 2, 2, 0]))  # (B, h+3, w+3, C)
        zeros2 = op.Constant(value_ints=[0, 0])
        quad = op.Concat(
            op.Unsqueeze(op.Slice(v, zeros2, ends, axes12), op.Constant(value_ints=[3])),
            op.Unsqueeze(
                op.Slice(
                    v, op.Constant(value_ints=[0, 1]), op.Constant(value_ints=[-1, 1 << 62]), axes12
                ),
                op.Constant(value_ints=[3]),
            ),
            op.Unsqueeze(
                op.Slice(
                    v, op.Constant(value_ints=[1, 0]), op.Constant(value_ints=[1 << 62, -1]), axes12
                ),
                op.Constant(value_ints=[3]),
            ),
            op.Unsqueeze(op.Slice(v, starts1, big, axes12), op.Constant(value_ints=[3])),
            axis=3,
        )  # (B, h + 2, w + 2, 4, C)
        hp, wp = op.Add(h_l, two_i), op.Add(w_l, two_i)
        cells = op.Mul(hp, wp)
        quad = op.Reshape(
            quad, op.Constant(value_ints=[0, -1, 4, num_heads, head_dim])
        )  # (B, cells, 4, H, Dh)
        table = op.Reshape(
            op.Transpose(quad, perm=[0, 1, 3, 2, 4]), op.Constant(value_ints=[-1, 4 * head_dim])
        )  # rows (b, y, x, head)
        loc_l = op.Gather(loc, index, axis=3)  # (B, Q, H, P, 2)
        ok = op.Gather(finite, index, axis=3)  # (B, Q, H, P)
        h_f, w_f = op.Cast(h_l, to=1), op.Cast(w_l, to=1)
        x = op.Sub(op.Mul(op.Gather(loc_l, zero_i, axis=4), w_f), half_f)  # (B, Q, H, P)
        y = op.Sub(op.Mul(op.Gather(loc_l, one_i, axis=4), h_f), half_f)
        x = op.Where(ok, op.Clip(x, minus1, w_f), minus1)
        y = op.Where(ok, op.Clip(y, minus1, h_f), minus1)
        x0, y0 = op.Floor(x), op.Floor(y)
        fx, fy = op.Sub(x, x0), op.Sub(y, y0)
        gx, gy = op.Sub(one_f, fx), op.Sub(one_f, fy)
        attn = op.Unsqueeze(
            op.Gather(attention_weights, index, axis=3), op.Constant(value_ints=[-1])
        )  # (B, Q, H, P, 1)
        last = op.Constant(value_ints=[-1])
        weights = op.Mul(
            op.Concat(
                op.Unsqueeze(op.Mul(gy, gx), last),
                op.Unsqueeze(op.Mul(gy, fx), last),
                op.Unsqueeze(op.Mul(fy, gx), last),
                op.Unsqueeze(op.Mul(fy, fx), last),
                axis=-1,
            ),
            attn,
        )  # (B, Q, H, P, 4)
        cell = op.Add(
            op.Mul(op.Cast(op.Add(y0, one_f), to=7), wp), op.Cast(op.Add(x0, one_f), to=7)
        )
        rows = op.Add(op.Mul(op.Add(op.Mul(b_index, cells), cell), heads), h_index)
        for p in range(num_points):
            point = op.Constant(value_int=p)
            sampled = op.Gather(table, op.Gather(rows, point, axis=3), axis=0)  # (B, Q, H, 4Dh)
            sampled = op.Reshape(sampled, op.Constant(value_ints=[0, 0, 0, 4, head_dim]))
            w_p = op.Unsqueeze(op.Gather(weights, point, axis=3), last)  # (B, Q, H, 4, 1)
            term = op.ReduceSum(
                op.Mul(sampled, w_p), op.Constant(value_ints=[3]), keepdims=0
            )  # (B, Q, H, Dh)
            out = term if out is None else op.Add(out, term)
    return op.Reshape(out, op.Concat(batch, queries, op.Constant(value_ints=[channels]), axis=0))


def topk_category_gather_onnx(scores: FLOAT, embeddings: FLOAT, k: int, force=None):
    """``scores [B, C]``, ``embeddings [B, C, D]`` or ``[C, D]`` -> ``indices [B, k]`` int64
    (best first) and ``gathered [B, k, D]``. Inference only: ``force`` must be None."""
    if force is not None:
        raise ValueError("topk_category_gather ONNX translation: force= is a training option")
    _, indices = op.TopK(scores, op.Constant(value_ints=[k]), axis=1, largest=1, sorted=1)
    if len(embeddings.shape) == 2:
        gathered = op.Gather(embeddings, indices, axis=0)
    else:
        gathered = op.GatherND(
            embeddings, op.Unsqueeze(indices, op.Constant(value_ints=[-1])), batch_dims=1
        )
    return indices, gathered


MSDA_FORMS = {"grid": ms_deform_attn_onnx, "gather": ms_deform_attn_onnx_gather}


def translation_table(msda_form: str = "grid") -> dict:
    """The exporter's ``custom_translation_table``: our ops -> their ONNX forms
    (``msda_form``: ``"grid"``, :func:`ms_deform_attn_onnx`, or ``"gather"``,
    :func:`ms_deform_attn_onnx_gather`). Empty without the compiled ops (the model then calls
    the references, plain ATen ops)."""
    import torch

    from cqdino import _ext

    if msda_form not in MSDA_FORMS:
        raise ValueError(f"msda_form must be one of {sorted(MSDA_FORMS)}, got {msda_form!r}")
    if not _ext.has_ext():
        return {}
    return {
        torch.ops.cqdino.ms_deform_attn_forward.default: MSDA_FORMS[msda_form],
        torch.ops.cqdino.topk_category_gather.default: topk_category_gather_onnx,
    }


CUSTOM_TRANSLATION_TABLE = translation_table()

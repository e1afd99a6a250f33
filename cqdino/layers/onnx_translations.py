"""ONNX translations of the ``cqdino::`` ops for ``torch.onnx.export(dynamo=True)``.

The exporter traces the model to an ``ExportedProgram`` that calls our compiled ops; these
onnxscript functions tell it how to write each op in standard ONNX operators, so the ONNX model
runs in any ONNX runtime without a custom-op library. They are passed as the exporter's
``custom_translation_table`` (:data:`CUSTOM_TRANSLATION_TABLE`); the PyTorch model is not
changed. Importing this module needs ``onnxscript`` (``pip install -e .[export]``); nothing in
:mod:`cqdino.layers` imports it.

What the ONNX graph computes (same semantics as the ops, different cost):

* ``cqdino::ms_deform_attn_forward`` -> the pure-PyTorch reference
  (:func:`~cqdino.layers.ms_deform_attn.ms_deform_attn_reference`) in ONNX: per level a
  ``Slice`` of the value, one ``GridSample`` (bilinear, zero padding, ``align_corners=0``) over
  all queries and points of the level, then a weighted ``ReduceSum`` over levels x points. Like
  the reference it materialises the sampled ``[B*H, Dh, Q, L*P]`` tensor (the compiled kernel
  does not): at the encoder of an 800 x 1333 image that is ~0.7 GB per call in fp32.
  Non-finite sampling locations sample zeros, as in the op.
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
    "topk_category_gather_onnx",
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
    ``B``, ``S``, ``Q`` and the level sizes may be dynamic."""
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
    # (B, Q, H, L, P, 2) -> (B, H, L, Q, P, 2)
    grid = op.Transpose(grid, perm=[0, 2, 3, 1, 4, 5])
    bh = op.Mul(batch, op.Constant(value_ints=[num_heads]))
    samples = []
    for lvl in range(num_levels):
        index = op.Constant(value_ints=[lvl])
        hw = op.Reshape(op.Gather(spatial_shapes, index, axis=0), op.Constant(value_ints=[2]))
        start = op.Gather(level_start_index, index, axis=0)  # (1,)
        end = op.Add(start, op.ReduceProd(hw, keepdims=1))
        v_l = op.Slice(v, start, end, op.Constant(value_ints=[3]))  # (B, H, Dh, H_l * W_l)
        v_l = op.Reshape(v_l, op.Concat(bh, op.Constant(value_ints=[head_dim]), hw, axis=0))
        g_l = op.Gather(grid, index, axis=2)  # (B, H, 1, Q, P, 2)
        g_l = op.Reshape(
            g_l, op.Concat(bh, queries, op.Constant(value_ints=[num_points, 2]), axis=0)
        )
        # (B*H, Dh, Q, P)
        samples.append(
            op.GridSample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=0)
        )
    stacked = op.Concat(*samples, axis=-1)  # (B*H, Dh, Q, L*P), level-major as the weights
    attn = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])  # (B, H, Q, L, P)
    attn = op.Reshape(
        attn, op.Concat(bh, one, queries, op.Constant(value_ints=[num_levels * num_points]), axis=0)
    )
    out = op.ReduceSum(op.Mul(stacked, attn), op.Constant(value_ints=[-1]), keepdims=0)
    out = op.Reshape(
        out, op.Concat(batch, op.Constant(value_ints=[num_heads * head_dim]), queries, axis=0)
    )
    return op.Transpose(out, perm=[0, 2, 1])  # (B, Q, H * Dh)


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


def _table():
    import torch

    from cqdino import _ext

    if not _ext.has_ext():  # the model then calls the references, plain ATen ops
        return {}
    return {
        torch.ops.cqdino.ms_deform_attn_forward.default: ms_deform_attn_onnx,
        torch.ops.cqdino.topk_category_gather.default: topk_category_gather_onnx,
    }


CUSTOM_TRANSLATION_TABLE = _table()

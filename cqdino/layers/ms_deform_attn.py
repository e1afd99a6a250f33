"""Multi-scale deformable attention (Deformable-DETR / DINO).

One file per op: the pure-PyTorch reference, the compiled op with its autograd and fake
(meta) registrations, and the DINO module built on it.

Shapes (B batch, S = sum of H_l * W_l keys, H heads, Dh channels per head, Q queries,
L levels, P points per level)::

    value               [B, S, H, Dh]
    spatial_shapes      [L, 2] int64   (H_l, W_l)
    level_start_index   [L] int64
    sampling_locations  [B, Q, H, L, P, 2]   (x, y) in [0, 1]
    attention_weights   [B, Q, H, L, P]
    output              [B, Q, H * Dh]

Locations off the map sample zeros (bilinear, zero padding). A non-finite location (NaN or
+-inf in either coordinate) is treated the same way: it contributes zero to the output and gets
zero gradient, as in the original Deformable-DETR kernel (its bounds tests are false for NaN), so
the output and gradients stay finite. The reference does the same (``grid_sample`` alone would
return NaN). A diverging offset head is therefore not visible in this op's output:
``check_finite=True`` raises on non-finite locations, and :class:`MultiScaleDeformableAttention`
turns non-finite *offsets* into a NaN output, so the loss and the training loop's non-finite
checks (the matcher's, detectron2's on the summed losses) stop the step.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cqdino import _ext

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "ms_deform_attn_gather",
    "check_finite_locations",
    "MultiScaleDeformableAttention",
]


def check_finite_locations(sampling_locations: Tensor) -> None:
    """Raise ``ValueError`` if ``sampling_locations`` hold NaN or inf (host sync on CUDA)."""
    bad = ~torch.isfinite(sampling_locations.detach())
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"ms_deform_attn: sampling_locations hold {int(bad.sum())} non-finite values "
            f"(NaN/inf), the first at index {first} of shape {tuple(sampling_locations.shape)} "
            "(B, Q, H, L, P, 2); without check_finite they are treated as off the map "
            "(a diverging sampling-offset head?)"
        )


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    check_finite: bool = False,
) -> Tensor:
    """Pure-PyTorch multi-scale deformable attention (per-level ``grid_sample``).

    Computes in the value's dtype (locations and weights are cast to it). Materialises a
    ``[B*H, Dh, Q, L*P]`` tensor, so it is memory-hungry at encoder sizes. Non-finite locations
    contribute zero, like the compiled op's (see the module doc); ``check_finite`` as in
    :func:`ms_deform_attn`.
    """
    if check_finite:
        check_finite_locations(sampling_locations)
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    levels = value.split([h * w for h, w in shapes], dim=1)
    grids = (2 * sampling_locations - 1).to(value.dtype)
    # Off-map and non-finite locations sample zeros, as in the kernel: grid coordinates beyond
    # +-3 are more than a pixel outside any map (clamping also keeps grid_sample's own
    # arithmetic from overflowing), and NaN/inf points go to -3. Zero gradient for both.
    finite = torch.isfinite(grids).all(-1, keepdim=True)
    grids = torch.where(finite, grids.clamp(-3.0, 3.0), torch.full_like(grids, -3.0))
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
        v = levels[lvl].flatten(2).transpose(1, 2).reshape(B * H, Dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*H, Q, P, 2)
        samples.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*H, Dh, Q, P)
    attn = attention_weights.to(value.dtype).transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * attn).sum(-1)  # (B*H, Dh, Q)
    return out.view(B, H * Dh, Q).transpose(1, 2).contiguous()


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention as row gathers: the form the ONNX translation writes
    (:func:`cqdino.layers.onnx_translations.ms_deform_attn_onnx`, step for step), here in
    PyTorch so that it can be checked in float64 against :func:`ms_deform_attn_reference`.

    Per level, the value map is zero-padded (1 pixel before, 2 after each side) and laid out
    as a table whose row ``(b, y, x, head)`` holds the 4 bilinear neighbours ``(y, x)``,
    ``(y, x+1)``, ``(y+1, x)``, ``(y+1, x+1)`` (``4 * Dh`` floats: 4x the level's value).
    Each sampling point is then one row ``Gather`` (its top-left neighbour's row; points
    clamped to ``[-1, W]`` x ``[-1, H]`` land in the zero padding when off the map, so no
    bounds masks), weighted by bilinear weight x attention weight and summed over the 4
    neighbours into the ``[B, Q, H, Dh]`` output, one point at a time: the largest temporary
    is one point's ``[B, Q, H, 4 * Dh]`` (the reference and ``GridSample`` hold
    ``[B * H, Dh, Q, L * P]``, 4x more). Non-finite locations contribute zero, as in the op.
    Forward only (not meant for training).
    """
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    dtype = value.dtype
    loc = sampling_locations.to(dtype).clamp(-1.0, 2.0)  # keeps the index arithmetic finite
    finite = torch.isfinite(sampling_locations).all(-1)  # (B, Q, H, L, P)
    attn = attention_weights.to(dtype)
    batch = torch.arange(B, device=value.device)[:, None, None, None]
    head = torch.arange(H, device=value.device)[None, None, :, None]
    minus1 = torch.full((), -1.0, dtype=dtype, device=value.device)
    out = value.new_zeros(B, Q, H, Dh)
    for lvl in range(L):
        h_l, w_l = (int(v) for v in spatial_shapes[lvl])
        start = int(level_start_index[lvl])
        v = value[:, start : start + h_l * w_l].reshape(B, h_l, w_l, H * Dh)
        v = F.pad(v, (0, 0, 1, 2, 1, 2))  # (B, h + 3, w + 3, H * Dh), zeros around
        quad = torch.stack([v[:, :-1, :-1], v[:, :-1, 1:], v[:, 1:, :-1], v[:, 1:, 1:]], 3)
        cells = (h_l + 2) * (w_l + 2)
        # (B, h + 2, w + 2, 4, H * Dh) -> rows (b, y, x, head) of 4 * Dh
        table = quad.reshape(B, cells, 4, H, Dh).transpose(2, 3).reshape(B * cells * H, 4 * Dh)
        # pixel coordinates (align_corners=False), off-map points clamped into the padding
        x = loc[:, :, :, lvl, :, 0] * w_l - 0.5  # (B, Q, H, P)
        y = loc[:, :, :, lvl, :, 1] * h_l - 0.5
        ok = finite[:, :, :, lvl]
        x = torch.where(ok, x.clamp(-1.0, float(w_l)), minus1)
        y = torch.where(ok, y.clamp(-1.0, float(h_l)), minus1)
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        a = attn[:, :, :, lvl]  # (B, Q, H, P)
        # (B, Q, H, P, 4): the neighbours' bilinear weights x the attention weight
        weights = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], -1)
        weights = weights * a[..., None]
        cell = (y0 + 1).to(torch.int64) * (w_l + 2) + (x0 + 1).to(torch.int64)
        rows = (batch * cells + cell) * H + head  # (B, Q, H, P)
        for p in range(P):
            sampled = table[rows[..., p]].view(B, Q, H, 4, Dh)
            out = out + (sampled * weights[..., p, :, None]).sum(3)
    return out.reshape(B, Q, H * Dh)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    deterministic: bool = False,
    check_finite: bool = False,
) -> Tensor:
    """Multi-scale deformable attention through ``torch.ops.cqdino.ms_deform_attn_forward``.

    Differentiable w.r.t. ``value``, ``sampling_locations`` and ``attention_weights``.
    Inputs need not be contiguous. The level tables may live on the CPU (then they are
    validated on every call) or on the value's device.

    dtypes: value fp64/fp32/fp16/bf16; locations and weights in the value's dtype, or fp32 for
    half values; accumulation in fp32 (fp64 for fp64). The output has the value's dtype.

    Determinism: the CPU backward is always bitwise deterministic. The CUDA backward is
    deterministic (value gradients accumulated in 64-bit fixed point) when ``deterministic``
    is True or ``torch.use_deterministic_algorithms(True)`` is in effect at backward time.

    Non-finite (NaN/inf) sampling locations are treated as off the map: zero contribution and
    zero gradient (see the module doc). ``check_finite=True`` raises a ``ValueError`` instead;
    it costs one reduction over the locations and, on CUDA, a host sync.

    Falls back to :func:`ms_deform_attn_reference`, with a one-time warning, when the compiled
    extension is unavailable.
    """
    if check_finite:
        check_finite_locations(sampling_locations)
    if not _ext.use_ext("ms_deform_attn", value.device.type):
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return torch.ops.cqdino.ms_deform_attn_forward(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        bool(deterministic),
    )


def ms_deform_attn_flops(value_shape, sampling_locations_shape) -> int:
    """Floating-point operations of one forward (a multiply-add counts 2, as
    ``torch.utils.flop_counter`` counts matmuls): for each batch entry, query, head, level and
    point, a bilinear sample of the head's ``Dh`` channels (4 corner multiply-adds per
    channel) weighted by its attention weight (1 more): ``10 * B * Q * H * L * P * Dh``.

    Args:
        value_shape: ``(B, S, H, Dh)``.
        sampling_locations_shape: ``(B, Q, H, L, P, 2)``.
    """
    B, _, H, Dh = value_shape
    b, Q, h, L, P, two = sampling_locations_shape
    if (b, h, two) != (B, H, 2):
        raise ValueError(
            f"value {tuple(value_shape)} and sampling locations "
            f"{tuple(sampling_locations_shape)} do not match (B, H, 2)"
        )
    return 10 * B * Q * H * L * P * Dh


if _ext.has_ext():

    @torch.library.register_fake("cqdino::ms_deform_attn_forward")
    def _forward_fake(
        value, spatial_shapes, level_start_index, sampling_locations, weights, deterministic=False
    ):
        B, _, H, Dh = value.shape
        return value.new_empty((B, sampling_locations.shape[1], H * Dh))

    @torch.library.register_fake("cqdino::_ms_deform_attn_forward_naive")
    def _forward_naive_fake(value, spatial_shapes, level_start_index, sampling_locations, weights):
        B, _, H, Dh = value.shape
        return value.new_empty((B, sampling_locations.shape[1], H * Dh))

    @torch.library.register_fake("cqdino::_ms_deform_attn_backward_naive")
    def _backward_naive_fake(grad, value, shapes, starts, sampling_locations, weights):
        return (
            torch.empty_like(value),
            torch.empty_like(sampling_locations),
            torch.empty_like(weights),
        )

    @torch.library.register_fake("cqdino::ms_deform_attn_backward")
    def _backward_fake(
        grad, value, shapes, starts, sampling_locations, weights, deterministic=False
    ):
        return (
            torch.empty_like(value),
            torch.empty_like(sampling_locations),
            torch.empty_like(weights),
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:5])
        ctx.deterministic = bool(inputs[5]) if len(inputs) > 5 else False

    def _backward(ctx, grad_output):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.cqdino.ms_deform_attn_backward(
            grad_output.contiguous(),
            value,
            shapes,
            starts,
            locations,
            weights,
            ctx.deterministic or torch.are_deterministic_algorithms_enabled(),
        )
        return grad_value, None, None, grad_loc, grad_attn, None

    torch.library.register_autograd(
        "cqdino::ms_deform_attn_forward", _backward, setup_context=_setup_context
    )

    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.cqdino.ms_deform_attn_forward)
    def _forward_flops(value, shapes, starts, locations, weights, *args, out_shape=None, **kw):
        # torch.utils.flop_counter.FlopCounterMode counts the compiled op too
        return ms_deform_attn_flops(value, locations)


class MultiScaleDeformableAttention(nn.Module):
    """The deformable attention module of Deformable-DETR / DINO (detrex's signature).

    Each query predicts ``num_points`` sampling offsets per head and level around its reference
    point, and softmax-normalised weights over the ``num_levels * num_points`` samples.
    A query whose predicted offsets are non-finite (a diverging offset head) gets a NaN output,
    so that a non-finite loss reports it (the op alone would treat the points as off the map).
    Offsets, locations and the softmax are computed in fp32, also under autocast; only the
    value projection may run in half precision.

    Args:
        embed_dim: channels of query and value.
        num_heads: attention heads; ``embed_dim`` must divide by it.
        num_levels: feature levels.
        num_points: sampling points per head and level.
        dropout: dropout on the output before the residual.
        batch_first: ``query``/``value`` are ``[B, N, C]`` when True, ``[N, B, C]`` otherwise.
        check_finite: raise when the sampling locations are non-finite (a diverging offset
            head, or non-finite reference points) instead of treating them as off the map; a
            host sync per call on CUDA. Also settable later as the ``check_finite`` attribute.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
        batch_first: bool = True,
        check_finite: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.batch_first = batch_first
        self.check_finite = check_finite
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # Initial offsets point in 8 directions (one per head), growing with the point index.
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        identity: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        reference_points: Optional[Tensor] = None,
        spatial_shapes: Optional[Tensor] = None,
        level_start_index: Optional[Tensor] = None,
        **kwargs,
    ) -> Tensor:
        """
        Args:
            query: ``[B, Q, C]`` (``[Q, B, C]`` when not batch_first).
            key: unused (kept for detrex compatibility).
            value: ``[B, S, C]`` flattened multi-scale features; defaults to ``query``.
            identity: residual added to the output; defaults to ``query``.
            query_pos: positional embedding added to ``query`` before predicting offsets.
            key_padding_mask: ``[B, S]`` bool, True at padded positions (their value is zeroed).
            reference_points: ``[B, Q, L, 2]`` normalised points or ``[B, Q, L, 4]`` boxes
                (cx, cy, w, h); offsets are scaled by the level size or by half the box size.
            spatial_shapes: ``[L, 2]`` int64 (H_l, W_l).
            level_start_index: ``[L]`` int64.

        Returns:
            ``identity + dropout(output_proj(attention))``, shaped like ``query``.
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query, value, identity = (t.transpose(0, 1) for t in (query, value, identity))
        if reference_points is None or spatial_shapes is None or level_start_index is None:
            raise ValueError(
                "MultiScaleDeformableAttention needs reference_points, spatial_shapes and "
                "level_start_index"
            )
        B, Q, _ = query.shape
        S = value.shape[1]
        H, L, P = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape != (L, 2):
            raise ValueError(
                f"spatial_shapes must be [{L}, 2] for num_levels={L}, "
                f"got {tuple(spatial_shapes.shape)}"
            )

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(B, S, H, self.embed_dim // H)

        # Offsets, locations and softmax in fp32 even under autocast.
        with torch.autocast(device_type=query.device.type, enabled=False):
            q32 = query.float()
            offsets = F.linear(
                q32, self.sampling_offsets.weight.float(), self.sampling_offsets.bias.float()
            ).view(B, Q, H, L, P, 2)
            weights = F.linear(
                q32, self.attention_weights.weight.float(), self.attention_weights.bias.float()
            )
            weights = weights.view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
            # The op treats non-finite locations as off the map, which would hide a diverging
            # offset head; such queries get a NaN output instead, so the loss (and the training
            # loop's non-finite-loss check) sees it. Non-finite reference points (a level that
            # is all padding for an image) keep the op's off-map rule.
            diverged = ~torch.isfinite(offsets).flatten(2).all(-1)  # (B, Q)
            ref = reference_points.float()
            if ref.shape[-1] == 2:
                normalizer = spatial_shapes.to(device=ref.device, dtype=torch.float32).flip(-1)
                locations = (
                    ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
                )
            elif ref.shape[-1] == 4:
                locations = (
                    ref[:, :, None, :, None, :2] + offsets / P * ref[:, :, None, :, None, 2:] * 0.5
                )
            else:
                raise ValueError(
                    "reference_points must be [B, Q, L, 2] or [B, Q, L, 4], got "
                    f"{tuple(reference_points.shape)}"
                )
        if value.dtype not in (torch.float16, torch.bfloat16):
            locations, weights = locations.to(value.dtype), weights.to(value.dtype)
        out = ms_deform_attn(
            value,
            spatial_shapes,
            level_start_index,
            locations,
            weights,
            check_finite=self.check_finite,
        )
        out = out.masked_fill(diverged[..., None], float("nan"))
        out = self.output_proj(out)
        out = identity + self.dropout(out)
        return out if self.batch_first else out.transpose(0, 1)

"""Random multi-scale deformable attention problems for the tests."""

from typing import Optional, Sequence, Tuple

import torch


def level_tables(shapes: Sequence[Tuple[int, int]], device="cpu"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, starts, int(areas.sum())


def random_problem(
    shapes: Sequence[Tuple[int, int]],
    batch: int = 2,
    queries: int = 5,
    heads: int = 2,
    head_dim: int = 4,
    points: int = 2,
    dtype: torch.dtype = torch.float64,
    loc_dtype: Optional[torch.dtype] = None,
    device="cpu",
    spread: float = 0.2,
    generator: Optional[torch.Generator] = None,
    kink_margin: float = 1e-3,
):
    """Inputs with sampling locations in [-spread, 1 + spread] (some points off the map).

    Bilinear sampling is not differentiable where a pixel coordinate ``x * W - 0.5`` is an
    integer (corner switch, edge of the support); points within ``kink_margin`` pixels of such a
    kink are moved off it, so finite differences in ``gradcheck`` do not straddle one.
    """
    spatial_shapes, starts, S = level_tables(shapes, device)
    L = len(shapes)
    loc_dtype = loc_dtype or dtype
    kw = dict(generator=generator)
    value = torch.randn(batch, S, heads, head_dim, **kw).to(device, dtype)
    loc = torch.rand(batch, queries, heads, L, points, 2, **kw) * (1 + 2 * spread) - spread
    # (W_l, H_l) per level, broadcast over [B, Q, H, L, P, 2]
    size = spatial_shapes.flip(-1).to("cpu", torch.float64).view(1, 1, 1, L, 1, 2)
    pix = loc.double() * size - 0.5
    near = (pix - pix.round()).abs() < kink_margin
    loc = torch.where(near, (pix.round() + 2 * kink_margin + 0.5) / size, loc.double()).float()
    attn = torch.rand(batch, queries, heads, L, points, **kw)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, starts, loc.to(device, loc_dtype), attn.to(device, loc_dtype)

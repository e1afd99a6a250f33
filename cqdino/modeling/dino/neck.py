"""ChannelMapper neck: maps backbone levels to one width with 1x1 conv + GroupNorm and adds
extra stride-2 levels; GroupNorm statistics are taken over each image's valid (unpadded) region
so a batch's padding does not change an image's features (detrex's neck normalises over the
padding too)."""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

__all__ = ["MaskedGroupNorm", "ChannelMapper", "level_masks"]


def level_masks(
    image_sizes: Union[Sequence[Tuple[int, int]], Tensor],
    shape: Tuple[int, int],
    stride: int,
    device,
) -> Tensor:
    """Padding mask ``[B, H, W]`` (True = pad) of a stride-``stride`` level of padded size
    ``shape``: valid extent ``ceil(h / stride) x ceil(w / stride)`` (what stride-2 convs and
    patch merging with padding produce for an unpadded image).

    ``image_sizes``: ``(h, w)`` Python ints per image, or an int64 ``[B, 2]`` tensor (the
    traceable form that ``torch.export`` needs: no Python loop over images, no host sync)."""
    H, W = shape
    if isinstance(image_sizes, Tensor):
        extent = -torch.div(-image_sizes.to(device), stride, rounding_mode="floor")  # ceil
        rows = torch.arange(H, device=device)[None, :, None] >= extent[:, 0, None, None]
        cols = torch.arange(W, device=device)[None, None, :] >= extent[:, 1, None, None]
        return rows | cols
    mask = torch.ones(len(image_sizes), H, W, dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(image_sizes):
        mask[i, : -(-h // stride), : -(-w // stride)] = False
    return mask


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover only valid positions (``mask`` True = padding).
    Without a mask it is ``nn.GroupNorm``."""

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if mask is None:
            return super().forward(x)
        B, C, H, W = x.shape
        G = self.num_groups
        dtype = x.dtype
        x = x.float()  # statistics in fp32, also under autocast (as nn.GroupNorm)
        valid = (~mask).float()[:, None]  # (B, 1, H, W)
        xg = x.reshape(B, G, C // G, H, W)
        vg = valid[:, None]  # (B, 1, 1, H, W)
        n = vg.sum(dim=(2, 3, 4), keepdim=True) * (C // G)
        mean = (xg * vg).sum(dim=(2, 3, 4), keepdim=True) / n.clamp(min=1)
        var = (((xg - mean) * vg) ** 2).sum(dim=(2, 3, 4), keepdim=True) / n.clamp(min=1)
        y = ((xg - mean) / torch.sqrt(var + self.eps)).reshape(B, C, H, W)
        if self.affine:
            y = (
                y * self.weight.float()[None, :, None, None]
                + self.bias.float()[None, :, None, None]
            )
        return y.to(dtype)


class _ConvGN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=True)
        self.norm = MaskedGroupNorm(groups, cout)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return self.norm(self.conv(x), mask)


class ChannelMapper(nn.Module):
    """
    Args:
        input_shapes: backbone output name -> ShapeSpec (channels, stride), in increasing stride;
            must be the backbone's ``output_shape()`` (checked when the model is built).
        in_features: names to use, in order.
        out_channels: width of every output level.
        num_extra_levels: stride-2 3x3 conv levels added after the last input (DINO: 1).
        num_groups: GroupNorm groups.

    Forward returns a list of ``[B, out_channels, H_l, W_l]`` maps and their strides.
    """

    def __init__(
        self,
        input_shapes: Dict[str, ShapeSpec],
        in_features: List[str],
        out_channels: int = 256,
        num_extra_levels: int = 1,
        num_groups: int = 32,
    ):
        super().__init__()
        self.in_features = list(in_features)
        missing = [f for f in self.in_features if f not in input_shapes]
        if missing:
            raise ValueError(
                f"ChannelMapper: in_features {missing} have no entry in input_shapes "
                f"({sorted(input_shapes)})"
            )
        # the declared input shapes; the meta-architecture checks them against the backbone
        self.input_shapes = {f: input_shapes[f] for f in self.in_features}
        shapes = [input_shapes[f] for f in self.in_features]
        self.lateral = nn.ModuleList(
            _ConvGN(s.channels, out_channels, 1, 1, num_groups) for s in shapes
        )
        extra, cin = [], shapes[-1].channels
        for _ in range(num_extra_levels):
            extra.append(_ConvGN(cin, out_channels, 3, 2, num_groups))
            cin = out_channels
        self.extra = nn.ModuleList(extra)
        self.strides = [s.stride for s in shapes] + [
            shapes[-1].stride * 2 ** (i + 1) for i in range(num_extra_levels)
        ]

    def forward(
        self,
        features: Dict[str, Tensor],
        image_sizes: Union[Sequence[Tuple[int, int]], Tensor, None] = None,
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            features: backbone outputs.
            image_sizes: valid ``(h, w)`` per image (or an int64 ``[B, 2]`` tensor, see
                :func:`level_masks`); None means no padding.

        Returns:
            ``(maps, masks)``: per level ``[B, C, H_l, W_l]`` and ``[B, H_l, W_l]`` bool
            (True = padding).
        """

        def mask_for(x, stride):
            if image_sizes is None:
                return torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
            return level_masks(image_sizes, tuple(x.shape[-2:]), stride, x.device)

        outs, masks = [], []
        for name, layer, stride in zip(self.in_features, self.lateral, self.strides):
            x = features[name]
            m = mask_for(x, stride)
            outs.append(layer(x, m))
            masks.append(m)
        x = features[self.in_features[-1]]
        for i, layer in enumerate(self.extra):
            stride = self.strides[len(self.lateral) + i]
            # Zero the padded region so the strided conv sees what an unpadded image would.
            x = x.masked_fill(masks[-1][:, None], 0.0)
            y = layer.conv(x)
            m = mask_for(y, stride)
            y = layer.norm(y, m)
            outs.append(y)
            masks.append(m)
            x = y
        return outs, masks

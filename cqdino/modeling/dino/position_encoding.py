"""Sine positional encodings: 2-D maps for the encoder (normalised over each image's valid
region, so padding does not change them) and box/point embeddings for decoder queries."""

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "sine_embed_boxes"]


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine encoding from a padding mask.

    Args:
        num_pos_feats: channels per axis (output has ``2 * num_pos_feats``).
        temperature: wavelength base.
        normalize: scale the cumulative coordinates to ``[0, scale]`` over the valid region.
        scale: see ``normalize``.
        offset: added to the cumulative coordinates before normalising (DINO: -0.5, pixel
            centres).
        eps: keeps the normalisation finite.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = -0.5,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.normalize, self.scale, self.offset, self.eps = normalize, scale, offset, eps

    def forward(self, mask: Tensor) -> Tensor:
        """``[B, H, W]`` bool (True = padding) -> ``[B, 2 * num_pos_feats, H, W]`` float."""
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float, device=mask.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        px = x[..., None] / dim_t
        py = y[..., None] / dim_t
        px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], dim=4).flatten(3)
        py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], dim=4).flatten(3)
        return torch.cat([py, px], dim=3).permute(0, 3, 1, 2)


def sine_embed_boxes(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """``[..., 2 or 4]`` normalised points/boxes -> ``[..., 2 or 4 * num_feats]`` sine features,
    ordered (y, x, w, h) as in DINO's query positional embedding."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def embed(coord: Tensor) -> Tensor:
        p = coord[..., None] * scale / dim_t
        return torch.stack([p[..., 0::2].sin(), p[..., 1::2].cos()], dim=-1).flatten(-2)

    parts = [embed(boxes[..., 1]), embed(boxes[..., 0])]
    if boxes.shape[-1] == 4:
        parts += [embed(boxes[..., 2]), embed(boxes[..., 3])]
    elif boxes.shape[-1] != 2:
        raise ValueError(f"sine_embed_boxes expects [..., 2] or [..., 4], got {tuple(boxes.shape)}")
    return torch.cat(parts, dim=-1)

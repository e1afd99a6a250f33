"""Backbone adapters returning C3-C5 (ResNet, detectron2's implementation) or the last three
Swin stages (timm ``features_only``, NCHW), plus the two training presets.

Presets (``BACKBONE_PRESETS``):

* ``"scratch"`` (offline default, no ImageNet weights): trainable BatchNorm, nothing frozen, lr
  multiplier 1. detectron2's FrozenBN / ``FREEZE_AT=2`` defaults would leave a randomly
  initialised stem and res2 frozen and the normalisation fixed, and training stalls.
* ``"pretrained"`` (the published recipe; weights only through ``train.init_checkpoint``):
  FrozenBN, frozen stem, backbone lr x 0.01.
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from torch import Tensor, nn

__all__ = [
    "BACKBONE_PRESETS",
    "build_resnet",
    "TimmSwinBackbone",
    "build_timm_swin_backbone",
    "ConvPaddingZeroer",
]

BACKBONE_PRESETS = {
    "scratch": {"norm": "BN", "freeze_at": 0, "lr_multiplier": 1.0},
    "pretrained": {"norm": "FrozenBN", "freeze_at": 1, "lr_multiplier": 0.01},
}


def build_resnet(
    depth: int = 50,
    norm: str = "BN",
    freeze_at: int = 0,
    out_features: Sequence[str] = ("res3", "res4", "res5"),
    stride_in_1x1: bool = False,
    width: int = 64,
    channels_last: bool = False,
) -> ResNet:
    """detectron2 ResNet-``depth`` (18/34 basic blocks, 50/101/152 bottlenecks).

    Args:
        norm: detectron2 norm name ("BN", "SyncBN", "FrozenBN", "GN", ...).
        freeze_at: 0 = nothing frozen, 1 = stem, 2 = stem + res2, ...
        out_features: default C3-C5 (strides 8, 16, 32).
        stride_in_1x1: MSRA-style bottlenecks (False matches torchvision/detrex weights).
        width: stem / res2 width of R18/R34 (64 is the standard network; smaller values give
            the thin networks used in CPU tests).
        channels_last: run the convolutions in NHWC memory layout (weights and input; the
            outputs are NHWC-strided NCHW tensors). Same numbers up to rounding; on the CPU
            oneDNN's NHWC kernels make the R18 demo backbone's training step about 1.45x
            faster (``benchmarks/demo_step.py``).
    """
    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"build_resnet: depth must be one of 18/34/50/101/152, got {depth}")
    if depth < 50:
        blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
        stages = [
            ResNet.make_stage(
                BasicBlock,
                n,
                in_channels=width * 2 ** max(i - 1, 0),
                out_channels=width * 2**i,
                stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                norm=norm,
            )
            for i, n in enumerate(blocks)
        ]
    else:
        if width != 64:
            raise ValueError("build_resnet: width is only supported for depth 18/34")
        stages = ResNet.make_default_stages(depth, norm=norm, stride_in_1x1=stride_in_1x1)
    stem = BasicStem(in_channels=3, out_channels=width, norm=norm)
    cls = ChannelsLastResNet if channels_last else ResNet
    net = cls(stem, stages, out_features=list(out_features), freeze_at=freeze_at)
    return net.to(memory_format=torch.channels_last) if channels_last else net


class ChannelsLastResNet(ResNet):
    """detectron2's ResNet fed NHWC (``channels_last``) input; build with
    ``build_resnet(..., channels_last=True)``, which also converts the weights."""

    def forward(self, x: torch.Tensor):
        return super().forward(x.contiguous(memory_format=torch.channels_last))


_SWIN_VARIANTS = {
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_b": "swin_base_patch4_window12_384",
    "swin_l": "swin_large_patch4_window12_384",
}


class TimmSwinBackbone(Backbone):
    """Swin-T/B/L from timm (no download: ``pretrained=False``; load weights with
    ``train.init_checkpoint``), for any input size.

    Inputs are padded (zeros, bottom/right) to a multiple of 32 = patch 4 x three 2x merges; timm
    pads each stage to the window size itself (``strict_img_size=False``). Outputs NCHW
    ``res3``..``res5`` (strides 8, 16, 32) or more with ``out_indices``.

    Args:
        variant: "swin_t", "swin_b", "swin_l" or a timm model name.
        out_indices: stages to return (0 = stride 4).
        drop_path_rate: stochastic depth.
        freeze_patch_embed: freeze the patch embedding (the pretrained recipe's "stem").
    """

    def __init__(
        self,
        variant: str = "swin_t",
        out_indices: Sequence[int] = (1, 2, 3),
        drop_path_rate: float = 0.2,
        freeze_patch_embed: bool = False,
    ):
        super().__init__()
        import timm

        name = _SWIN_VARIANTS.get(variant, variant)
        self.body = timm.create_model(
            name,
            pretrained=False,
            features_only=True,
            out_indices=tuple(out_indices),
            strict_img_size=False,
            drop_path_rate=drop_path_rate,
        )
        info = self.body.feature_info
        self._names = [f"res{i + 2}" for i in out_indices]
        self._out_feature_channels = dict(zip(self._names, info.channels()))
        self._out_feature_strides = dict(zip(self._names, info.reduction()))
        self._out_features = self._names
        if freeze_patch_embed:
            for name, p in self.body.named_parameters():
                if name.startswith("patch_embed"):
                    p.requires_grad_(False)

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``[B, 3, H, W]`` -> name -> ``[B, C, H_pad / s, W_pad / s]`` (H, W padded to 32)."""
        H, W = x.shape[-2:]
        d = self.size_divisibility
        x = F.pad(x, (0, (d - W % d) % d, 0, (d - H % d) % d))
        outs = self.body(x)
        return {n: o.permute(0, 3, 1, 2).contiguous() for n, o in zip(self._names, outs)}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._names
        }


@BACKBONE_REGISTRY.register()
def build_timm_swin_backbone(cfg, input_shape) -> Backbone:
    """yacs builder: ``MODEL.BACKBONE.NAME = "build_timm_swin_backbone"``, variant in
    ``MODEL.SWIN.VARIANT``, stages ``MODEL.SWIN.OUT_INDICES``."""
    return TimmSwinBackbone(
        cfg.MODEL.SWIN.VARIANT,
        cfg.MODEL.SWIN.OUT_INDICES,
        cfg.MODEL.SWIN.DROP_PATH_RATE,
        freeze_patch_embed=cfg.MODEL.BACKBONE.FREEZE_AT >= 1,
    )


class ConvPaddingZeroer:
    """Zeroes the padded region of every ``nn.Conv2d`` input and output of a CNN (detectron2's
    ``Conv2d`` applies its norm first), so the network computes on a padded batch exactly what it
    computes on each image alone (inference; BatchNorm in eval mode). Convolutions and the
    stem's max-pool then see zeros beyond the image border, as zero padding / non-negative
    max-pool inputs give on an unpadded image. The valid extent at stride ``s`` is
    ``ceil(size / s)``. Not exact for attention backbones (Swin).

    Usage: ``zeroer = ConvPaddingZeroer(backbone)``; call ``zeroer.set(image_sizes,
    padded_size)`` before each forward (the meta-architecture does).

    ``image_sizes`` may also be an int64 ``[B, 2]`` tensor (``torch.export``): the valid extent
    of a ``(H, W)`` map is then ``ceil(h * H / PH)``, which is ``ceil(h / s)`` when the padded
    size ``PH`` is a multiple of the map's stride ``s`` (the padded batches of the
    meta-architecture are), computed without Python control flow on the sizes.
    """

    def __init__(self, module: nn.Module):
        self.image_sizes: Union[List[Tuple[int, int]], Tensor, None] = None
        self.padded_size: Optional[Tuple[int, int]] = None
        self._cache: Dict[Tuple[int, int], Tensor] = {}
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(self._pre_hook)
                m.register_forward_hook(self._hook)

    def set(
        self, image_sizes: Union[List[Tuple[int, int]], Tensor], padded_size: Tuple[int, int]
    ) -> None:
        self._cache = {}
        self.padded_size = tuple(padded_size)
        if isinstance(image_sizes, Tensor):
            self.image_sizes = image_sizes
            return
        padded = [tuple(s) != tuple(padded_size) for s in image_sizes]
        self.image_sizes = [tuple(s) for s in image_sizes] if any(padded) else None

    def _pre_hook(self, module: nn.Module, args):
        return (self._hook(module, args, args[0]),) + tuple(args[1:])

    def _hook(self, module: nn.Module, args, out: Tensor) -> Tensor:
        if self.image_sizes is None or out.dim() != 4:
            return out
        if isinstance(self.image_sizes, Tensor):
            H, W = out.shape[-2:]
            PH, PW = self.padded_size
            sizes = self.image_sizes.to(out.device)
            eh = torch.div(sizes[:, 0] * H + PH - 1, PH, rounding_mode="floor")  # (B,)
            ew = torch.div(sizes[:, 1] * W + PW - 1, PW, rounding_mode="floor")
            keep = (torch.arange(H, device=out.device)[None, :, None] < eh[:, None, None]) & (
                torch.arange(W, device=out.device)[None, None, :] < ew[:, None, None]
            )
            return out * keep[:, None].to(out.dtype)
        if out.shape[0] != len(self.image_sizes):
            return out
        H, W = out.shape[-2:]
        key = (H, W)
        if key not in self._cache:
            PH, PW = self.padded_size
            stride = next(
                (s for s in (1, 2, 4, 8, 16, 32, 64, 128) if -(-PH // s) == H and -(-PW // s) == W),
                None,
            )
            if stride is None:
                self._cache[key] = None
            else:
                from .neck import level_masks

                mask = level_masks(self.image_sizes, (H, W), stride, out.device)
                self._cache[key] = (~mask)[:, None]
        keep = self._cache[key]
        return out if keep is None else out * keep.to(out.dtype)

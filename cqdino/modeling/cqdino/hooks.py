"""CQ-DINO's modules for the two hook points of the DINO transformer
(:mod:`cqdino.modeling.dino.transformer`): the encoder image<->category fusion before every
encoder layer and the decoder category cross-attention in every decoder layer, plus the
builders the configs call."""

import dataclasses
from typing import List, Sequence, Tuple

from torch import Tensor, nn

from ..dino.heads import ClassHeadState
from ..dino.transformer import DINOTransformer
from .fusion import CategoryCrossAttention, ImageCategoryFusion

__all__ = [
    "EncoderCategoryFusion",
    "DecoderCategoryAttention",
    "encoder_fusion_layers",
    "decoder_category_attention",
    "install_category_hooks",
]


class EncoderCategoryFusion(nn.Module):
    """Encoder hook: :class:`~.fusion.ImageCategoryFusion` between the image
    memory and the state's category tokens; returns the new memory and a state holding the
    updated tokens (read by the following layers, the decoder and the head)."""

    def __init__(
        self,
        embed_dim: int = 256,
        fusion_dim: int = 1024,
        num_heads: int = 4,
        init_values: float = 1e-4,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.fusion = ImageCategoryFusion(
            embed_dim, embed_dim, fusion_dim, num_heads, dropout, drop_path, init_values
        )

    def forward(
        self, memory: Tensor, memory_pos: Tensor, padding_mask: Tensor, state: ClassHeadState
    ) -> Tuple[Tensor, ClassHeadState]:
        """``memory [B, S, D]`` (positions unused, as in the authors' fusion), ``padding_mask
        [B, S]`` True = pad, ``state.embeddings [B, K, D]``."""
        memory, tokens = self.fusion(memory, state.embeddings, padding_mask)
        return memory, dataclasses.replace(state, embeddings=tokens)


class DecoderCategoryAttention(nn.Module):
    """Decoder hook: object queries (+ their positional embedding) attend to the state's
    category tokens; residual + LayerNorm (:class:`~.fusion.CategoryCrossAttention`)."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = CategoryCrossAttention(embed_dim, num_heads, dropout)

    def forward(self, query: Tensor, query_pos: Tensor, state: ClassHeadState) -> Tensor:
        """``query``/``query_pos`` ``[B, N, D]`` -> ``[B, N, D]``."""
        return self.attn(query, state.embeddings, query_pos)


def encoder_fusion_layers(
    num_layers: int = 6,
    embed_dim: int = 256,
    fusion_dim: int = 1024,
    num_heads: int = 4,
    init_values: float = 1e-4,
    drop_path: float = 0.0,
) -> List[EncoderCategoryFusion]:
    """One fusion hook per encoder layer (for ``DeformableEncoder(fusion_layers=...)``)."""
    return [
        EncoderCategoryFusion(embed_dim, fusion_dim, num_heads, init_values, drop_path)
        for _ in range(num_layers)
    ]


def decoder_category_attention(
    num_layers: int = 6, embed_dim: int = 256, num_heads: int = 8, dropout: float = 0.0
) -> List[DecoderCategoryAttention]:
    """One category cross-attention per decoder layer (``DeformableDecoder(category_attn=...)``)."""
    return [DecoderCategoryAttention(embed_dim, num_heads, dropout) for _ in range(num_layers)]


def install_category_hooks(
    transformer: DINOTransformer,
    fusion_layers: Sequence[nn.Module],
    category_attn: Sequence[nn.Module],
) -> DINOTransformer:
    """Fill the hook points of an already built DINO transformer (used by the yacs path, which
    builds the transformer through DINO's ``from_config``). Returns the transformer."""
    enc, dec = transformer.encoder, transformer.decoder
    if len(fusion_layers) != len(enc.layers) or len(category_attn) != dec.num_layers:
        raise ValueError(
            f"{len(fusion_layers)} fusion hooks / {len(category_attn)} category-attention hooks "
            f"for {len(enc.layers)} encoder / {dec.num_layers} decoder layers"
        )
    enc.fusion_layers = nn.ModuleList(fusion_layers)
    for layer, hook in zip(dec.layers, category_attn):
        layer.category_attn = hook
    return transformer

"""DINO's deformable transformer: deformable encoder, two-stage proposal generation with mixed
query selection, and a decoder with iterative box refinement and look-forward-twice.

Relative to Deformable-DETR/DINO it adds two optional hook points, ``None`` for DINO, that
CQ-DINO fills (see :mod:`cqdino.modeling.dino.heads` for the state they read and write):

* encoder ``fusion_layers[i]`` runs before encoder layer i::

      memory, state = fusion(memory, memory_pos, padding_mask, state)
      # memory, memory_pos [B, S, D]; padding_mask [B, S] (True = pad); returns a new
      # ClassHeadState (e.g. dataclasses.replace(state, embeddings=T_new))

* decoder ``category_attn`` of each layer runs between self-attention and deformable
  cross-attention, with its own residual and norm::

      query = category_attn(query, query_pos, state)   # [B, N, D] -> [B, N, D]

Padding: reference points and proposals are normalised to each image's valid region and the
query positional embedding is computed from those (not from the padded-normalised points, as
DINO does), so an image's outputs do not depend on how much it is padded.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cqdino.layers import MultiScaleDeformableAttention

from .box_ops import inverse_sigmoid
from .heads import ClassHead, ClassHeadState
from .position_encoding import sine_embed_boxes

__all__ = [
    "MLP",
    "DeformableEncoderLayer",
    "DeformableEncoder",
    "DeformableDecoderLayer",
    "DeformableDecoder",
    "DINOTransformer",
]


class MLP(nn.Module):
    """``num_layers`` linears with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _FFN(nn.Module):
    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(embed_dim, ffn_dim), nn.Linear(ffn_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


def level_centres(shapes: List[Tuple[int, int]], valid_ratios: Tensor) -> List[Tensor]:
    """Per level ``[B, H*W, 2]`` (x, y) pixel centres normalised to each image's valid region
    (``valid_ratios [B, L, 2]``, (w, h)); ``shapes`` are Python ints (no host sync)."""
    out = []
    for lvl, (H, W) in enumerate(shapes):
        y, x = torch.meshgrid(
            torch.arange(H, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            torch.arange(W, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        x = x.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * W)
        y = y.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * H)
        out.append(torch.stack([x, y], -1))
    return out


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: multi-scale deformable self-attention, then FFN."""

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            embed_dim, num_heads, num_levels, num_points, dropout
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = _FFN(embed_dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor,
    ) -> Tensor:
        src = self.self_attn(
            src,
            value=src,
            query_pos=pos,
            key_padding_mask=padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        src = self.norm1(src)
        return self.norm2(self.ffn(src))


class DeformableEncoder(nn.Module):
    """
    Args:
        num_layers: encoder layers (each a :class:`DeformableEncoderLayer`).
        embed_dim, num_heads, ffn_dim, num_levels, num_points, dropout: layer sizes.
        fusion_layers: optional per-layer hooks run before each layer (see module doc);
            None, or a list of ``num_layers`` modules / None entries.
        use_checkpoint: activation checkpointing of each layer (and hook) in training
            (``torch.utils.checkpoint``, non-reentrant): less memory, one more forward.
    """

    def __init__(
        self,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
        fusion_layers: Optional[List[Optional[nn.Module]]] = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(embed_dim, num_heads, ffn_dim, num_levels, num_points, dropout)
            for _ in range(num_layers)
        )
        if fusion_layers is not None and len(fusion_layers) != num_layers:
            raise ValueError(
                f"fusion_layers has {len(fusion_layers)} entries for {num_layers} encoder layers"
            )
        self.fusion_layers = (
            nn.ModuleList([f if f is not None else nn.Identity() for f in fusion_layers])
            if fusion_layers is not None
            else None
        )
        self.use_checkpoint = use_checkpoint

    @staticmethod
    def reference_points(shapes: List[Tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel-centre points of every level, normalised to each image's valid region, seen
        from every level: ``[B, S, L, 2]`` (x, y), padded-normalised."""
        ref = torch.cat(level_centres(shapes, valid_ratios), 1)  # (B, S, 2) valid-normalised
        return ref[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        shapes: List[Tuple[int, int]],
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        padding_mask: Tensor,
        state: ClassHeadState,
    ) -> Tuple[Tensor, ClassHeadState]:
        """``src``/``pos`` ``[B, S, D]``, ``shapes`` the per-level ``(H, W)`` (Python ints;
        ``spatial_shapes`` the same as a device tensor for the deformable attention),
        ``valid_ratios`` ``[B, L, 2]``, ``padding_mask`` ``[B, S]`` -> memory ``[B, S, D]`` and
        the (possibly updated) state."""
        ref = self.reference_points(shapes, valid_ratios)
        ckpt = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if self.fusion_layers is not None and not isinstance(
                self.fusion_layers[i], nn.Identity
            ):
                fusion = self.fusion_layers[i]
                if ckpt:
                    src, state = checkpoint(
                        fusion, src, pos, padding_mask, state, use_reentrant=False
                    )
                else:
                    src, state = fusion(src, pos, padding_mask, state)
            args = (src, pos, ref, spatial_shapes, level_start_index, padding_mask)
            src = checkpoint(layer, *args, use_reentrant=False) if ckpt else layer(*args)
        return src, state


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: self-attention (with the DN attention mask) -> optional
    ``category_attn`` hook -> multi-scale deformable cross-attention -> FFN."""

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
        category_attn: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.category_attn = category_attn
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dim, num_heads, num_levels, num_points, dropout
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = _FFN(embed_dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        self_attn_mask: Optional[Tensor],
        state: ClassHeadState,
    ) -> Tensor:
        q = query + query_pos
        out = self.self_attn(q, q, query, attn_mask=self_attn_mask, need_weights=False)[0]
        query = self.norm1(query + self.dropout(out))
        if self.category_attn is not None:
            query = self.category_attn(query, query_pos, state)
        query = self.cross_attn(
            query,
            value=memory,
            query_pos=query_pos,
            key_padding_mask=memory_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        query = self.norm2(query)
        return self.norm3(self.ffn(query))


class DeformableDecoder(nn.Module):
    """Decoder with iterative box refinement and look-forward-twice.

    Layer i predicts ``delta_i = bbox_embed[i](norm(h_i))``. Its output box is
    ``sigmoid(delta_i + logit(b_{i-1}))`` where ``b_{i-1}`` is the previous layer's box *with*
    gradient (look-forward-twice); the reference fed to layer i+1 is the same box detached.
    Both the box and class predictions read the normed hidden state ``norm(h_i)``.

    Args:
        num_layers: decoder layers (each a :class:`DeformableDecoderLayer`).
        embed_dim, num_heads, ffn_dim, num_levels, num_points, dropout: layer sizes.
        category_attn: optional per-layer hooks (see module doc); None, or a list of
            ``num_layers`` modules / None entries.
        share_box_head: one box MLP for every layer (``bbox_embed[i]`` all the same module)
            instead of one per layer (DINO's default).
    """

    def __init__(
        self,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
        category_attn: Optional[List[Optional[nn.Module]]] = None,
        share_box_head: bool = False,
    ):
        super().__init__()
        if category_attn is not None and len(category_attn) != num_layers:
            raise ValueError(
                f"category_attn has {len(category_attn)} entries for {num_layers} decoder layers"
            )
        hooks = category_attn if category_attn is not None else [None] * num_layers
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(
                embed_dim, num_heads, ffn_dim, num_levels, num_points, dropout, category_attn=h
            )
            for h in hooks
        )
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
        if share_box_head:
            shared = MLP(embed_dim, embed_dim, 4, 3)
            self.bbox_embed = nn.ModuleList(shared for _ in hooks)
        else:
            self.bbox_embed = nn.ModuleList(MLP(embed_dim, embed_dim, 4, 3) for _ in hooks)
        self.norm = nn.LayerNorm(embed_dim)
        for mlp in self.bbox_embed:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        self.embed_dim = embed_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        query: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        self_attn_mask: Optional[Tensor],
        state: ClassHeadState,
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query: ``[B, N, D]`` content queries.
            reference_boxes: ``[B, N, 4]`` initial boxes (sigmoid space, valid-normalised).
            memory: ``[B, S, D]``; memory_padding_mask ``[B, S]``.
            valid_ratios: ``[B, L, 2]``.
            self_attn_mask: ``[N, N]`` bool (True = blocked) or None.

        Returns:
            ``hidden [L_dec, B, N, D]`` (normed) and ``boxes [L_dec, B, N, 4]`` (cxcywh).
        """
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        ref = reference_boxes.detach()
        prev = reference_boxes.detach()
        hidden, boxes = [], []
        for i, layer in enumerate(self.layers):
            query_pos = self.ref_point_head(sine_embed_boxes(ref, self.embed_dim // 2))
            query = layer(
                query,
                query_pos,
                ref[:, :, None] * ratios,
                memory,
                memory_padding_mask,
                spatial_shapes,
                level_start_index,
                self_attn_mask,
                state,
            )
            h = self.norm(query)
            delta = self.bbox_embed[i](h)
            boxes.append((delta + inverse_sigmoid(prev)).sigmoid())
            new_ref = (delta + inverse_sigmoid(ref)).sigmoid()
            prev, ref = new_ref, new_ref.detach()
            hidden.append(h)
        return torch.stack(hidden), torch.stack(boxes)


class DINOTransformer(nn.Module):
    """Encoder + two-stage query selection + decoder.

    Args:
        encoder: :class:`DeformableEncoder`.
        decoder: :class:`DeformableDecoder`.
        num_levels: feature levels.
        num_queries: matching queries, selected from the encoder proposals (top by the max
            class logit) as anchor boxes; content queries are learned (mixed query selection).
        embed_dim: width.
    """

    def __init__(
        self,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        num_levels: int = 4,
        num_queries: int = 900,
        embed_dim: int = 256,
    ):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.num_levels, self.num_queries, self.embed_dim = num_levels, num_queries, embed_dim
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dim))
        self.enc_output = nn.Linear(embed_dim, embed_dim)
        self.enc_output_norm = nn.LayerNorm(embed_dim)
        self.enc_bbox_embed = MLP(embed_dim, embed_dim, 4, 3)
        self.tgt_embed = nn.Embedding(num_queries, embed_dim)
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)
        nn.init.zeros_(self.enc_bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.enc_bbox_embed.layers[-1].bias)

    @staticmethod
    def valid_ratios(mask: Tensor) -> Tensor:
        """``[B, H, W]`` padding mask -> ``[B, 2]`` valid fraction (w, h)."""
        _, H, W = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        return torch.stack([valid_w / W, valid_h / H], -1)

    def proposals(
        self,
        memory: Tensor,
        padding_mask: Tensor,
        shapes: List[Tuple[int, int]],
        valid_ratios: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """One proposal per memory position: centre = the pixel centre, size = 0.05 * 2^level,
        valid-normalised. Returns ``(output_memory [B, S, D], proposals [B, S, 4]`` in logit
        space (0 at invalid positions), ``invalid [B, S]`` bool)``."""
        props = []
        for lvl, xy in enumerate(level_centres(shapes, valid_ratios)):
            wh = torch.full_like(xy, 0.05 * 2.0**lvl)
            props.append(torch.cat([xy, wh], -1))
        props = torch.cat(props, 1)
        invalid = padding_mask | ~((props > 0.01) & (props < 0.99)).all(-1)
        props = inverse_sigmoid(props).masked_fill(invalid[..., None], 0.0)
        out = memory.masked_fill(invalid[..., None], 0.0)
        return self.enc_output_norm(self.enc_output(out)), props, invalid

    def forward(
        self,
        features: List[Tensor],
        masks: List[Tensor],
        pos_embeds: List[Tensor],
        class_head: ClassHead,
        state: ClassHeadState,
        dn_content: Optional[Tensor] = None,
        dn_ref_logits: Optional[Tensor] = None,
        dn_attn_mask: Optional[Tensor] = None,
    ):
        """
        Args:
            features: per level ``[B, D, H_l, W_l]``; masks ``[B, H_l, W_l]`` (True = pad);
                pos_embeds like features.
            class_head, state: scores the encoder proposals (and passed to the hooks).
            dn_content, dn_ref_logits, dn_attn_mask: from
                :class:`~cqdino.modeling.dino.denoising.CDNGenerator`, prepended to the queries.

        Returns:
            ``(hidden [L, B, N_dn + Q, D], boxes [L, B, N_dn + Q, 4], enc_outputs, state)`` with
            ``enc_outputs = {"pred_logits": [B, Q, N_col], "pred_boxes": [B, Q, 4]}`` (in
            training also ``"hidden": [B, Q, D]``, the proposals' features) of the
            selected proposals.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
        # (H, W) as the shapes give them: ints in eager, symbolic sizes under torch.export
        shapes = [(f.shape[-2], f.shape[-1]) for f in features]
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)  # (B, S, D)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(pos_embeds)],
            1,
        )
        mask = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        # level tables for the deformable attention: one small non-blocking copy each (the
        # Python shapes are what everything else reads)
        spatial_shapes = torch.tensor(shapes, dtype=torch.long).to(src.device, non_blocking=True)
        level_start_index = torch.tensor(starts, dtype=torch.long).to(src.device, non_blocking=True)
        valid_ratios = torch.stack([self.valid_ratios(m) for m in masks], 1)  # (B, L, 2)

        memory, state = self.encoder(
            src, pos, shapes, spatial_shapes, level_start_index, valid_ratios, mask, state
        )

        output_memory, props, invalid = self.proposals(memory, mask, shapes, valid_ratios)
        enc_logits = class_head(output_memory, state, None)  # (B, S, N_col)
        enc_coords = self.enc_bbox_embed(output_memory) + props  # (B, S, 4) logit space
        scores = enc_logits.max(-1)[0].masked_fill(invalid, float("-inf"))
        # a comparison, not min(): under torch.export it becomes a check on the input size and k
        # stays a constant (min() of a symbolic size would make the query count symbolic)
        k = self.num_queries if scores.shape[1] >= self.num_queries else scores.shape[1]
        topk = scores.topk(k, dim=1).indices  # (B, k)
        top_coords = enc_coords.gather(1, topk[..., None].expand(-1, -1, 4))
        top_logits = enc_logits.gather(1, topk[..., None].expand(-1, -1, enc_logits.shape[-1]))
        enc_outputs = {"pred_logits": top_logits, "pred_boxes": top_coords.sigmoid()}
        if self.training:  # the proposals' features, for auxiliary losses (e.g. name words)
            D = output_memory.shape[-1]
            enc_outputs["hidden"] = output_memory.gather(1, topk[..., None].expand(-1, -1, D))

        B = src.shape[0]
        query = self.tgt_embed.weight[None, :k].expand(B, -1, -1)
        ref = top_coords.detach().sigmoid()
        attn_mask = None
        if dn_content is not None:
            query = torch.cat([dn_content, query], 1)
            ref = torch.cat([dn_ref_logits.sigmoid(), ref], 1)
            attn_mask = dn_attn_mask
            if k < self.num_queries:  # fewer proposals than queries: trim the mask
                n = dn_content.shape[1] + k
                attn_mask = attn_mask[:n, :n]
        hidden, boxes = self.decoder(
            query,
            ref,
            memory,
            mask,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            attn_mask,
            state,
        )
        return hidden, boxes, enc_outputs, state

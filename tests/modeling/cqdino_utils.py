"""Small CQ-DINO builders for the tests and the benchmark: the DINO test model of
:func:`tests.modeling.utils.tiny_dino` with the contrastive head, a narrow selector and the
fusion / category-attention hooks."""

from typing import Optional

from cqdino.modeling import (
    CQDINO,
    build_contrastive_class_head,
    decoder_category_attention,
    encoder_fusion_layers,
    install_category_hooks,
)
from tests.modeling.utils import tiny_dino


def tiny_cqdino(
    num_categories: int = 10,
    topk: int = 5,
    num_queries: int = 50,
    layers: int = 2,
    embed_dim: int = 64,
    ffn_dim: int = 128,
    dn_number: int = 20,
    width: int = 32,
    query_dim: int = 64,
    selector_ffn_dim: int = 128,
    fusion_dim: int = 128,
    relation: str = "none",
    tree_file: Optional[str] = None,
    selection_loss: str = "asl",
    force_gt: bool = False,
    stage1: bool = False,
    use_checkpoint: bool = False,
    **head_kwargs,
) -> CQDINO:
    """R18 (``width``) backbone, ``layers`` + ``layers`` transformer of width ``embed_dim``,
    narrow selector (``query_dim`` wide, FFN ``selector_ffn_dim``), fusion width
    ``fusion_dim``."""
    head = build_contrastive_class_head(
        num_categories,
        in_channels=8 * width,  # R18 res5
        num_decoder_layers=layers,
        embed_dim=embed_dim,
        topk=topk,
        query_dim=query_dim,
        selector_memory_dim=query_dim,
        selector_ffn_dim=selector_ffn_dim,
        relation=relation,
        tree_file=tree_file,
        selection_loss=selection_loss,
        force_gt=force_gt,
        **head_kwargs,
    )
    base = tiny_dino(
        num_queries=num_queries,
        layers=layers,
        embed_dim=embed_dim,
        ffn_dim=ffn_dim,
        dn_number=dn_number,
        class_head=head,
        width=width,
        use_checkpoint=use_checkpoint,
    )
    install_category_hooks(
        base.transformer,
        encoder_fusion_layers(layers, embed_dim, fusion_dim, num_heads=4),
        decoder_category_attention(layers, embed_dim, num_heads=8),
    )
    return CQDINO(
        backbone=base.backbone,
        neck=base.neck,
        position_embedding=base.position_embedding,
        transformer=base.transformer,
        class_head=head,
        criterion=base.criterion,
        pixel_mean=base.pixel_mean.flatten().tolist(),
        pixel_std=base.pixel_std.flatten().tolist(),
        dn_number=dn_number,
        stage1=stage1,
    )

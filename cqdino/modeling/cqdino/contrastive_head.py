"""CQ-DINO's classification head: image-guided top-K category selection + contrastive logits.

Relative to DINO's :class:`~cqdino.modeling.dino.heads.LinearClassHead` (``Linear(256, C)`` over all
C classes) the logit columns are the K categories selected for each image::

    prepare():  E [C, 768] -> CategoryQueries -> CategorySelector(last backbone stage)
                -> scores s [B, C] (selection loss), top-K indices [B, K],
                   tokens T [B, K, 256]
    forward():  logit(q, k) = <o_q, T_k> / sqrt(256) + b_layer

A GT box's class target is its category's position among the image's K selected categories,
or ``-1`` (all-zero focal target, class cost 0 in the matcher) when it was not selected; the
DN label table has K + 1 rows, row K meaning "not selected".
"""

import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from cqdino.layers import contrastive_logits

from ..dino.heads import STAT_PREFIX, ClassHead, ClassHeadState
from ..dino.neck import level_masks
from .category_queries import BagOfWordsEncoder, CategoryQueries, CategorySelfAttention
from .selection_loss import SelectionLoss, image_level_targets
from .selector import CategorySelector
from .tree_aggregation import TreeAggregation

__all__ = [
    "ContrastiveClassHead",
    "build_contrastive_class_head",
    "load_category_tree",
]

# The recipe's selection loss is a sum over each GPU's batch of 2 images (16 on 8 GPUs).
SELECTION_LOSS_IMAGES = 2


class ContrastiveClassHead(ClassHead):
    """Contrastive head over the per-image top-K categories (REFERENCE steps 2-4 and 8).

    Owns the category queries, the category selector, the selection loss and one learnable
    scalar bias per prediction layer (``L`` decoder layers + the encoder proposals), each
    initialised to ``-log((1 - p) / p)`` with ``p = prior_prob``. One bias per layer because the
    authors' head clones its contrastive branch per layer (each clone with its own bias), like
    DINO's unshared linear heads; it costs ``L + 1`` parameters.

    ``K = min(num_topk, C)`` is fixed at construction: every image gets exactly K real columns
    (no padded slots).
    """

    def __init__(
        self,
        category_queries: CategoryQueries,
        selector: CategorySelector,
        selection_loss: SelectionLoss,
        *,
        num_decoder_layers: int = 6,
        in_feature: str = "res5",
        in_stride: int = 32,
        ancestor_mask: Optional[Callable[[Tensor], Tensor]] = None,
        force_gt: bool = False,
        prior_prob: float = 0.01,
        test_topk: Optional[int] = None,
        dense_loss_weight: float = 0.0,
    ):
        """
        Args:
            category_queries: the C category queries (:class:`CategoryQueries`).
            selector: :class:`CategorySelector`; its ``query_dim`` must equal the queries'
                width and its ``out_proj`` width the transformer width.
            selection_loss: :class:`SelectionLoss` on the selector's ``[B, C]`` scores.
            num_decoder_layers: L; the head holds ``L + 1`` biases.
            in_feature: backbone output the selector reads (the last stage).
            in_stride: stride of ``in_feature`` (for its padding mask).
            ancestor_mask: optional ``targets [B, C] bool -> ignore [B, C] bool`` (e.g.
                ``CategoryTree.ancestor_mask``): ancestors of a positive category that are not
                labelled themselves are left out of the selection loss.
            force_gt: in training, force the image's GT categories into its top-K (the rest
                filled by score; with more than K GT categories the K best-scoring are kept).
            prior_prob: initial foreground probability of the contrastive logits.
            test_topk: K at inference (default: the training K). A larger K at inference
                lets the detector name categories the selector ranked just below the
                training K (the columns are contrastive, so any K works).
            dense_loss_weight: weight of ``loss_select_dense`` (needs a ``"dense"`` score form
                of the selector): each location of the selector's feature map is a positive
                for the categories of the GT boxes holding its centre (and a box's centre
                cell for its category), a negative for every other category; sigmoid focal
                loss over ``[B, C, H * W]``, divided by the number of images. Box-level
                supervision of the map whose maximum scores a category: many positives per
                box instead of one image-level label. 0 (off) in the recipe.
        """
        super().__init__()
        if dense_loss_weight < 0 or (dense_loss_weight and selector.dense_query is None):
            raise ValueError(
                f"dense_loss_weight={dense_loss_weight} needs a weight >= 0 and a 'dense' "
                f"score form of the selector (it is {selector.score_form!r})"
            )
        self.dense_loss_weight = float(dense_loss_weight)
        C = category_queries.num_categories
        if selector.query_dim != category_queries.norm.normalized_shape[0]:
            raise ValueError(
                f"selector.query_dim={selector.query_dim} differs from the category-query width "
                f"{category_queries.norm.normalized_shape[0]}"
            )
        self.category_queries = category_queries
        self.selector = selector
        self.selection_loss = selection_loss
        self.ancestor_mask = ancestor_mask
        self.num_categories = C
        self.num_classes = C  # the dataset classes, as LinearClassHead.num_classes
        self.num_topk = min(selector.num_topk, C)
        self.in_feature, self.in_stride = in_feature, in_stride
        self.force_gt = force_gt
        if test_topk is not None and test_topk <= 0:
            raise ValueError(f"test_topk must be positive, got {test_topk}")
        self.test_topk = None if test_topk is None else min(test_topk, C)
        K = self.num_topk
        # DN labels are prompt positions 0..K-1 plus row K = "category not selected".
        self.num_dn_labels = K + 1
        self.num_noise_labels = K
        self.unselected_dn_label = K
        bias = -math.log((1 - prior_prob) / prior_prob)
        self.bias = nn.Parameter(torch.full((num_decoder_layers + 1,), bias))

    @property
    def embed_dim(self) -> int:
        return self.selector.out_proj.out_features

    def extra_repr(self) -> str:
        return (
            f"num_categories={self.num_categories}, num_topk={self.num_topk}, "
            f"in_feature={self.in_feature!r}, force_gt={self.force_gt}, "
            f"ancestor_mask={self.ancestor_mask is not None}"
        )

    def prepare(
        self,
        features: Dict[str, Tensor],
        image_sizes: List[tuple],
        gt_classes: Optional[List[Tensor]] = None,
        gt_boxes: Optional[List[Tensor]] = None,
    ) -> ClassHeadState:
        """Select each image's top-K categories.

        Returns a state with ``indices [B, K]`` (dataset classes, best first), ``embeddings
        [B, K, D]`` (tokens ``T``), and in training (``gt_classes`` given)
        ``losses = {"loss_select": ...}``.
        """
        if self.in_feature not in features:
            raise KeyError(
                f"ContrastiveClassHead reads backbone output {self.in_feature!r}, the backbone "
                f"gives {sorted(features)}"
            )
        x = features[self.in_feature]  # (B, Cin, H, W)
        mask = level_masks(image_sizes, tuple(x.shape[-2:]), self.in_stride, x.device)
        targets = force = None
        if gt_classes is not None:
            targets = image_level_targets(gt_classes, self.num_categories)  # (B, C) bool
            if self.force_gt:
                force = targets
        k = self.test_topk if (gt_classes is None and not self.training) else None
        out = self.selector(self.category_queries(), x, mask, force=force, num_topk=k)
        losses, ranking = {}, None
        if targets is None:  # the selector's ranking beyond K, for ARC@{K/2, K, 2K}
            ranking = out.scores.topk(min(2 * out.indices.shape[1], out.scores.shape[1])).indices
        else:
            # logged (not summed into the loss) by the trainer, as the losses are
            losses[f"{STAT_PREFIX}select_recall"] = _unforced_recall(
                out.scores, targets, out.indices.shape[1]
            )
            ignore = self.ancestor_mask(targets) if self.ancestor_mask is not None else None
            # Summed over the images of a GPU batch of SELECTION_LOSS_IMAGES (the authors' 2
            # per GPU), whatever the per-process batch: sum / B * 2. Mean over DDP ranks then
            # equals one process with the same total batch.
            loss = self.selection_loss(out.scores, targets, ignore)
            losses["loss_select"] = loss * (SELECTION_LOSS_IMAGES / len(image_sizes))
            if self.dense_loss_weight and gt_boxes is not None:
                logits = out.dense + self.selector.category_bias.to(out.dense.dtype)[:, None]
                pos = dense_targets(
                    gt_classes,
                    gt_boxes,
                    image_sizes,
                    tuple(x.shape[-2:]),
                    self.in_stride,
                    self.num_categories,
                )
                valid = ~mask.flatten(1)  # (B, H * W)
                loss = dense_focal_loss(logits, pos, valid)
                # per image, as loss_select: the mean over DDP ranks equals one process
                losses["loss_select_dense"] = self.dense_loss_weight * loss / len(image_sizes)
        return ClassHeadState(
            indices=out.indices, embeddings=out.tokens, losses=losses, ranking=ranking
        )

    def forward(self, hidden: Tensor, state: ClassHeadState, layer: Optional[int]) -> Tensor:
        """``hidden [B, Q, D]`` -> ``[B, Q, K]`` contrastive logits."""
        bias = self.bias[len(self.bias) - 1 if layer is None else layer]
        return contrastive_logits(hidden, state.embeddings, bias)

    def map_targets(self, gt_classes: List[Tensor], state: ClassHeadState) -> List[Tensor]:
        """Dataset classes -> position among the image's selected categories, ``-1`` if the
        category was not selected. One ``[B, C]`` lookup table built by a scatter: no loop over
        categories, no device-to-host sync."""
        indices = state.indices  # (B, K), distinct per image
        B, K = indices.shape
        pos = torch.arange(K, device=indices.device).expand(B, K)
        table = indices.new_full((B, self.num_categories), -1)
        table.scatter_(1, indices, pos)
        return [table[b, g.to(indices.device).long()] for b, g in enumerate(gt_classes)]


@torch.no_grad()
def dense_targets(
    gt_classes: List[Tensor],
    gt_boxes: List[Tensor],
    image_sizes: List[tuple],
    shape: tuple,
    stride: int,
    num_categories: int,
) -> Tensor:
    """``[B, C, H * W]`` float targets of the dense selection loss: location ``(i, j)`` (centre
    ``((j + 0.5) s, (i + 0.5) s)`` in pixels) is positive for the class of every GT box that
    holds its centre, and the cell holding a box's centre is positive for its class.

    ``gt_boxes``: per image ``[G, 4]`` cxcywh normalised by the image's valid ``(h, w)``."""
    H, W = shape
    device = gt_boxes[0].device if gt_boxes else None
    out = torch.zeros(len(gt_classes), num_categories, H * W, device=device)
    ys = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) * stride
    cy, cx = ys[:, None].expand(H, W).reshape(-1), xs[None, :].expand(H, W).reshape(-1)
    for b, (cls, box) in enumerate(zip(gt_classes, gt_boxes)):
        if len(box) == 0:
            continue
        h, w = image_sizes[b]
        scale = box.new_tensor([w, h, w, h])
        c = box.float() * scale  # (G, 4) pixels, cxcywh
        x0, y0 = c[:, 0] - c[:, 2] / 2, c[:, 1] - c[:, 3] / 2
        x1, y1 = c[:, 0] + c[:, 2] / 2, c[:, 1] + c[:, 3] / 2
        inside = (
            (cx >= x0[:, None]) & (cx <= x1[:, None]) & (cy >= y0[:, None]) & (cy <= y1[:, None])
        )
        centre = (c[:, 1] / stride).long().clamp(0, H - 1) * W + (c[:, 0] / stride).long().clamp(
            0, W - 1
        )
        inside = inside.float().scatter(1, centre[:, None], 1.0)  # (G, H * W)
        idx = cls.long().to(out.device)[:, None].expand_as(inside)
        out[b].scatter_reduce_(0, idx, inside, reduce="amax")
    return out


def dense_focal_loss(
    logits: Tensor, targets: Tensor, valid: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sigmoid focal loss (RetinaNet's) summed over ``[B, C, N]`` entries whose location is
    ``valid [B, N]``."""
    logits = logits.float()
    p = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    loss = a_t * ce * (1 - p_t) ** gamma
    return (loss * valid[:, None, :].to(loss.dtype)).sum()


@torch.no_grad()
def _unforced_recall(scores: Tensor, targets: Tensor, k: int) -> Tensor:
    """The fraction of the batch's (image, GT category) pairs that the selector's own top-K
    holds (before ``force_gt``), as a 0-dim tensor (no host sync)."""
    hit = targets.gather(1, scores.topk(k, dim=1).indices).sum()
    return hit / targets.sum().clamp(min=1)


def load_category_tree(
    tree_file: Union[str, os.PathLike],
    num_categories: int,
    category_ids: Optional[Sequence[int]] = None,
):
    """Load a category tree in the V3Det tree-json layout and check it has C categories.

    Args:
        tree_file: the json file (``categoryid2treeid``, ``father2child``/``child2father``...).
        num_categories: C of the model.
        category_ids: dataset category ids in contiguous order (default: the tree's sorted
            category ids, which is detectron2's contiguous order for COCO-style datasets).
    """
    from cqdino.data.hierarchy import CategoryTree  # the data package is optional for modeling

    path = os.fspath(tree_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"category tree file {path!r} does not exist (set the model's tree_file, or "
            "relation='none' / 'self_attn' and ancestor_masking=False)"
        )
    tree = CategoryTree.from_v3det_json(path, category_ids)
    if tree.num_categories != num_categories:
        raise ValueError(
            f"category tree {path} has {tree.num_categories} categories, the model has "
            f"C={num_categories}"
        )
    return tree


_SELECTION_LOSSES = {"asl": SelectionLoss.v3det, "bce": SelectionLoss.coco}
_RELATIONS = ("tree", "self_attn", "none")


def build_contrastive_class_head(
    num_categories: int,
    in_channels: int,
    *,
    num_decoder_layers: int = 6,
    embed_dim: int = 256,
    topk: int = 100,
    query_dim: int = 768,
    selector_memory_dim: int = 512,
    selector_num_heads: int = 4,
    selector_ffn_dim: int = 3072,
    selector_num_layers: int = 2,
    selector_chunk_size: int = 2048,
    selector_checkpoint: bool = False,
    selector_query_skip: bool = False,
    selector_score_form: str = "linear",
    selector_prior: Optional[Sequence[float]] = None,
    relation: str = "tree",
    self_attn_heads: int = 8,
    tree_file: Optional[str] = None,
    category_ids: Optional[Sequence[int]] = None,
    ancestor_masking: bool = True,
    init_embeddings: Optional[str] = None,
    category_names: Optional[Sequence[str]] = None,
    compositional_queries: bool = False,
    word_dim: Optional[int] = None,
    category_residual: bool = False,
    selection_loss: str = "asl",
    selection_loss_weight: Optional[float] = None,
    force_gt: bool = False,
    in_feature: str = "res5",
    in_stride: int = 32,
    prior_prob: float = 0.01,
    test_topk: Optional[int] = None,
    dense_loss_weight: float = 0.0,
) -> ContrastiveClassHead:
    """Build the head from plain values (the entry point of the yacs and LazyConfig configs).

    Args:
        num_categories: C.
        in_channels: channels of the selector's backbone level (R50 res5: 2048).
        num_decoder_layers: L of the decoder.
        embed_dim: transformer width (width of the category tokens T).
        topk: K (V3Det 100, COCO 30); ``min(K, C)`` is used.
        query_dim, selector_*: category-query width and selector sizes (recipe: 768, memory
            512, 4 heads, FFN 3072, 2 layers); CPU configs use narrow values.
            ``selector_chunk_size``/``selector_checkpoint`` bound its memory at large C;
            ``selector_query_skip`` adds the projected category query to each token
            (:class:`CategorySelector` ``query_skip``); ``selector_score_form`` and
            ``selector_prior`` (each category's fraction of training images, e.g.
            ``L(category_image_fraction)(...)``) are the selector's ``score_form`` / ``prior``.
        relation: "tree" (V3Det: :class:`TreeAggregation` over ``tree_file``), "self_attn"
            (COCO: :class:`CategorySelfAttention`, ``self_attn_heads`` heads) or "none".
        tree_file: category tree json (V3Det layout), needed by "tree" and by ancestor masking.
        category_ids: dataset category ids in contiguous order, if not the tree's sorted ids.
        ancestor_masking: mask ancestors of positives in the selection loss (needs the tree;
            ignored without ``tree_file``).
        init_embeddings: optional ``.pth``/``.npy`` ``[C, d]`` table for the category queries
            (e.g. text embeddings); random init otherwise.
        category_names: the C category names in model order (needed by
            ``compositional_queries``).
        compositional_queries: build each category's query from learnable vectors of the words
            of its name (:class:`BagOfWordsEncoder`, ``word_dim`` wide, default ``query_dim``;
            ``category_residual`` adds a free zero-initialised row per category) instead of a
            free ``[C, d]`` parameter. Exclusive with ``init_embeddings``.
        selection_loss: "asl" (V3Det: ASL gamma- 7, clip 0.05, sum, weight 1) or "bce" (COCO:
            summed BCE, weight 0.1).
        selection_loss_weight: replaces the preset's weight (None: the preset's, 1 / 0.1).
        force_gt, in_feature, in_stride, prior_prob, test_topk, dense_loss_weight: see
            :class:`ContrastiveClassHead`.
    """
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {_RELATIONS}, got {relation!r}")
    if selection_loss not in _SELECTION_LOSSES:
        raise ValueError(
            f"selection_loss must be one of {sorted(_SELECTION_LOSSES)}, got {selection_loss!r}"
        )
    if selection_loss_weight is not None and not (
        math.isfinite(selection_loss_weight) and selection_loss_weight >= 0
    ):
        raise ValueError(
            f"selection_loss_weight must be a finite number >= 0, got {selection_loss_weight!r}"
        )
    if relation == "tree" and not tree_file:
        raise ValueError("relation='tree' needs tree_file (a category tree json)")
    tree = load_category_tree(tree_file, num_categories, category_ids) if tree_file else None
    if relation == "tree":
        rel: Optional[nn.Module] = TreeAggregation(tree.category_dag())
    elif relation == "self_attn":
        rel = CategorySelfAttention(query_dim, self_attn_heads)
    else:
        rel = None
    encoder = None
    if compositional_queries:
        if category_names is None:
            raise ValueError(
                "compositional_queries needs category_names (e.g. model.class_head."
                "category_names = L(dataset_class_names)(dataset_name=..., num_classes=...))"
            )
        if len(category_names) != num_categories:
            raise ValueError(
                f"category_names has {len(category_names)} names, num_categories is "
                f"{num_categories}"
            )
        if init_embeddings is not None:
            raise ValueError(
                "compositional_queries and init_embeddings exclude each other (set "
                "init_embeddings=None)"
            )
        encoder = BagOfWordsEncoder(category_names, word_dim or query_dim, category_residual)
    queries = CategoryQueries(num_categories, query_dim, rel, init_embeddings, encoder)
    selector = CategorySelector(
        in_channels,
        num_topk=topk,
        query_dim=query_dim,
        memory_dim=selector_memory_dim,
        num_heads=selector_num_heads,
        ffn_dim=selector_ffn_dim,
        num_layers=selector_num_layers,
        out_dim=embed_dim,
        chunk_size=selector_chunk_size,
        checkpoint_chunks=selector_checkpoint,
        query_skip=selector_query_skip,
        score_form=selector_score_form,
        num_categories=num_categories,
        prior=selector_prior,
    )
    sel_loss = _SELECTION_LOSSES[selection_loss]()
    if selection_loss_weight is not None:
        sel_loss.weight = float(selection_loss_weight)
    return ContrastiveClassHead(
        queries,
        selector,
        sel_loss,
        num_decoder_layers=num_decoder_layers,
        in_feature=in_feature,
        in_stride=in_stride,
        ancestor_mask=tree.ancestor_mask if (tree is not None and ancestor_masking) else None,
        force_gt=force_gt,
        prior_prob=prior_prob,
        test_topk=test_topk,
        dense_loss_weight=dense_loss_weight,
    )

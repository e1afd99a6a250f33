"""Classification heads: the one place where DINO and CQ-DINO differ in how queries are scored.

The decoder, the two-stage query selection, the denoising (DN) queries, the Hungarian matcher,
the criterion and inference talk to classification only through :class:`ClassHead`. DINO uses
:class:`LinearClassHead` (``Linear(256, C)`` over all C dataset classes); CQ-DINO plugs in a
contrastive head over the K categories selected per image, without touching any of those
modules.

Vocabulary used below:

* **dataset class**: the contiguous id ``0..C-1`` detectron2 puts in ``Instances.gt_classes``.
* **logit column**: the last dimension of the head's logits, ``N_col`` wide. For DINO the
  columns are the dataset classes (``N_col = C``); for CQ-DINO they are the image's K selected
  categories (``N_col = K``, column k means "the k-th selected category of this image").
* **state**: a :class:`ClassHeadState` computed once per batch by :meth:`ClassHead.prepare`,
  *before* the encoder, and passed to every call below. Encoder/decoder hook modules may
  replace its ``embeddings`` (see :mod:`cqdino.modeling.dino.transformer`).

How a GT box becomes a target (:meth:`ClassHead.map_targets`): its dataset class is mapped to
a logit column, or to ``-1`` when the head has no column for it (CQ-DINO: the category was not
selected for this image). A ``-1`` GT still takes part in Hungarian matching with class cost 0
(box costs only) and in the box losses, but its focal-loss target row is all zero.

Who calls what (one training step of :class:`~cqdino.modeling.dino.meta_arch.DINO`)::

    state  = meta_arch.prepare_class_state(...)  # -> head.prepare(backbone feats, sizes, gt)
    labels = head.map_targets(gt_classes, state)          # matcher + criterion targets
    dn     = CDNGenerator(head.map_dn_labels(labels))     # table of head.num_dn_labels rows
    memory, state = encoder(..., state)                   # fusion hooks may update state
    enc_logits = head(proposal_feats, state, None)        # two-stage top-k by max over columns
    logits_i   = head(decoder_out_i, state, i)            # every layer, DN queries included
    losses = criterion(...) + state.losses
    # inference: classes = head.columns_to_classes(top-k columns, state)

Writing the CQ-DINO head (checklist): ``prepare`` runs the category selector and returns
``ClassHeadState(indices=[B, K], embeddings=T [B, K, 256], losses={"loss_select": ...})``;
``forward`` returns ``cqdino.layers.contrastive_logits(hidden, state.embeddings, bias)``;
``map_targets`` maps each GT class to its position in ``state.indices[b]``
or ``-1``; set ``num_dn_labels = K + 1``, ``unselected_dn_label = K``, ``num_noise_labels = K``;
``columns_to_classes`` already gathers from ``state.indices``. The CQ-DINO meta-architecture
passes ``fusion_layers`` to :class:`~cqdino.modeling.dino.transformer.DeformableEncoder` and
``category_attn`` to :class:`~cqdino.modeling.dino.transformer.DeformableDecoder`; nothing else
changes. Every image has the same number of columns (no padded columns).
``tests/modeling/test_meta_arch.py::SelectHead`` is a working miniature.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["ClassHeadState", "ClassHead", "LinearClassHead"]


# Loss-dict entries named ``stat_*`` are statistics of the step (e.g. the selector's unforced
# recall): logged by the trainer with the losses, in the same device-to-host transfer, never
# summed into the loss.
STAT_PREFIX = "stat_"


@dataclass
class ClassHeadState:
    """Per-batch classification state (all fields optional; DINO leaves them ``None``).

    Attributes:
        indices: ``[B, K]`` int64 dataset classes behind each logit column (CQ-DINO: the
            selected categories).
        embeddings: ``[B, K, D]`` category tokens ``T``; encoder fusion hooks update them
            (return a new state with :func:`dataclasses.replace`).
        losses: extra weighted losses of the head (CQ-DINO: the selection loss), merged into the
            meta-architecture's loss dict in training.
        ranking: ``[B, R]`` int64 categories best first by the selector's score, at inference
            (CQ-DINO: ``R = min(2K, C)``, for the selector's recall ``ARC@K``).
    """

    indices: Optional[Tensor] = None
    embeddings: Optional[Tensor] = None
    losses: Dict[str, Tensor] = field(default_factory=dict)
    ranking: Optional[Tensor] = None


class ClassHead(nn.Module):
    """Interface of a classification head. Subclasses implement :meth:`forward` and set
    :attr:`num_dn_labels`; the other methods have DINO-style defaults (columns = dataset
    classes).

    Attributes:
        num_dn_labels (int): rows of the DN label-embedding table
            (:class:`~cqdino.modeling.dino.denoising.CDNGenerator` owns the table).
        num_noise_labels (int): DN label noise draws uniformly from ``[0, num_noise_labels)``.
        unselected_dn_label (Optional[int]): DN label used for GTs mapped to ``-1``
            (CQ-DINO: K, the "not selected" row); ``None`` when targets can never be ``-1``.
    """

    num_dn_labels: int
    num_noise_labels: int
    unselected_dn_label: Optional[int] = None

    def prepare(
        self,
        features: Dict[str, Tensor],
        image_sizes: List[tuple],
        gt_classes: Optional[List[Tensor]] = None,
    ) -> ClassHeadState:
        """Compute the per-batch state before the encoder.

        Args:
            features: backbone outputs (name -> ``[B, C_l, H_l, W_l]``).
            image_sizes: valid ``(h, w)`` of each padded image.
            gt_classes: in training, each image's ``[G_i]`` int64 dataset classes; None at
                inference.
        """
        return ClassHeadState()

    def forward(self, hidden: Tensor, state: ClassHeadState, layer: Optional[int]) -> Tensor:
        """Class logits.

        Args:
            hidden: ``[B, Q, D]`` query features (decoder layer outputs, DN queries included,
                or encoder proposals).
            state: from :meth:`prepare`.
            layer: decoder layer index ``0..L-1``, or ``None`` for the encoder proposals.

        Returns:
            ``[B, Q, N_col]`` logits.
        """
        raise NotImplementedError

    def map_targets(self, gt_classes: List[Tensor], state: ClassHeadState) -> List[Tensor]:
        """Dataset classes ``[G_i]`` -> logit columns ``[G_i]`` int64, ``-1`` = no column."""
        return gt_classes

    def map_dn_labels(self, targets: Tensor) -> Tensor:
        """Mapped targets (from :meth:`map_targets`) -> rows of the DN label table."""
        if self.unselected_dn_label is None:
            # asynchronous on accelerators (no host sync per image); raises at once on the CPU
            torch._assert_async(
                (targets >= 0).all(),
                f"{type(self).__name__}.map_targets produced -1 targets but the head has no "
                "unselected_dn_label row",
            )
            return targets
        return torch.where(targets < 0, torch.full_like(targets, self.unselected_dn_label), targets)

    def columns_to_classes(self, columns: Tensor, state: ClassHeadState) -> Tensor:
        """Logit columns ``[B, N]`` int64 -> dataset classes ``[B, N]`` (inference)."""
        if state.indices is None:
            return columns
        return state.indices.gather(1, columns)


class LinearClassHead(ClassHead):
    """DINO's head: one ``Linear(embed_dim, num_classes)`` per decoder layer plus one for the
    encoder proposals (not shared, as in DINO), bias initialised to the focal prior
    ``-log((1 - p) / p)``.

    Args:
        num_classes: C, the number of dataset classes (13,204 on V3Det works; the logits are
            ``Q x C`` per layer, which is the memory cost the CQ-DINO comparison is about).
        embed_dim: query width D.
        num_decoder_layers: L; the head holds ``L + 1`` linears.
        prior_prob: initial foreground probability.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int = 256,
        num_decoder_layers: int = 6,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.num_dn_labels = num_classes
        self.num_noise_labels = num_classes
        self.decoder_layers = nn.ModuleList(
            nn.Linear(embed_dim, num_classes) for _ in range(num_decoder_layers)
        )
        self.encoder_layer = nn.Linear(embed_dim, num_classes)
        bias = -torch.log(torch.tensor((1 - prior_prob) / prior_prob)).item()
        for m in [*self.decoder_layers, self.encoder_layer]:
            nn.init.constant_(m.bias, bias)

    def forward(self, hidden: Tensor, state: ClassHeadState, layer: Optional[int]) -> Tensor:
        linear = self.encoder_layer if layer is None else self.decoder_layers[layer]
        return linear(hidden)

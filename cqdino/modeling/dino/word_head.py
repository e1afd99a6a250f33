"""An auxiliary name-word loss: every matched query also predicts the words of its GT
category's name.

In a vast vocabulary most categories have a handful of boxes, but their names share words
("red dotted star" and "red striped circle" share "red"; V3Det's 13,204 names share far fewer
distinct words). A category's own logit sees its few boxes; a word sees the boxes of every
category whose name holds it. :class:`NameWordHead` is a ``Linear(D, W)`` over the W distinct
words of the C names; in training each matched query (decoder layers, denoising groups and the
encoder's selected proposals) gets
a multi-label target, the words of its GT's name, and
:class:`~cqdino.modeling.dino.criterion.SetCriterion` adds the summed binary cross-entropy as
``loss_word``. It applies to any classification head (DINO's linear one as much as CQ-DINO's
contrastive one), since its target comes from the dataset class, not from a logit column (a
CQ-DINO GT whose category was not selected still gets its words).

At inference the words can also score the categories (``DINO(word_score_weight=beta)``): each
logit column ``c`` of a query gets ``beta * log_softmax_c(<l, y_c>)`` added, with ``l`` the
query's W word logits and ``y_c`` the multi-hot words of column c's name. ``<l, y_c>`` is, up to
a constant per query, the log-likelihood of exactly c's words under the independent word
probabilities ``sigmoid(l)``, so the term is the word model's posterior over the columns: a
category with few boxes of its own is named through words trained on thousands.
"""

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from cqdino.utils.text import word_vocabulary

__all__ = ["NameWordHead"]


class NameWordHead(nn.Module):
    """``Linear(embed_dim, W)`` word logits and the ``[C, W]`` word targets of the C names.

    The bias of word w starts at the log-odds of its frequency among the C names (clamped to
    [1e-3, 0.5]), so the loss starts near the entropy of the word distribution instead of at a
    large value that would dominate the first iterations.

    Args:
        category_names: the C category names in model (contiguous) order.
        embed_dim: query width D.
    """

    def __init__(self, category_names: Sequence[str], embed_dim: int):
        super().__init__()
        if category_names is None or len(category_names) == 0:
            raise ValueError(
                "NameWordHead needs the category names (e.g. model.word_head.category_names = "
                "L(dataset_class_names)(dataset_name=..., num_classes=...))"
            )
        self.words, rows = word_vocabulary(category_names)
        targets = torch.zeros(len(rows), len(self.words))
        for c, cols in enumerate(rows):
            targets[c, cols] = 1.0
        self.register_buffer("word_targets", targets, persistent=False)
        self.linear = nn.Linear(embed_dim, len(self.words))
        freq = targets.mean(0).clamp(1e-3, 0.5)
        with torch.no_grad():
            self.linear.bias.copy_(torch.log(freq / (1 - freq)))
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(embed_dim))

    @property
    def num_categories(self) -> int:
        return self.word_targets.shape[0]

    @property
    def num_words(self) -> int:
        return self.word_targets.shape[1]

    def extra_repr(self) -> str:
        return f"num_categories={self.num_categories}, num_words={self.num_words}"

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden [..., D]`` -> word logits ``[..., W]``."""
        return self.linear(hidden)

    def column_log_probs(self, hidden: Tensor, columns: Optional[Tensor] = None) -> Tensor:
        """The word model's log-posterior over the logit columns.

        Args:
            hidden: ``[B, Q, D]`` query features.
            columns: ``[B, K]`` dataset class of each logit column (CQ-DINO's selected
                categories), or None when the columns are the C dataset classes (DINO).

        Returns:
            ``[B, Q, K]`` (or ``[B, Q, C]``) ``log_softmax`` over the columns of ``<l, y_c>``.
        """
        logits = self.linear(hidden)  # (B, Q, W)
        if columns is None:
            scores = logits @ self.word_targets.T.to(logits.dtype)
        else:
            words = self.word_targets[columns].to(logits.dtype)  # (B, K, W)
            scores = torch.einsum("bqw,bkw->bqk", logits, words)
        return torch.log_softmax(scores, dim=-1)

    def targets(self, classes: Tensor) -> Tensor:
        """Dataset classes ``[G]`` -> multi-hot word targets ``[G, W]``."""
        return self.word_targets[classes.long()]

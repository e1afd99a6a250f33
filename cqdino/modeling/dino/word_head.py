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

With ``tree_softmax`` the tree tokens of :func:`cqdino.data.build.category_words` (``"tree:"``
tokens, each category's path from the top down) are read as a hierarchy: a token's parent is
the token before it on a path, and the children of a parent (the top-level tokens together)
form a group. A tree token's probability is a softmax over its group instead of an independent
sigmoid, so its loss is ``sum over the path of (logsumexp over the group - logit)``, the
cross-entropy of a coarse-to-fine classifier: every box teaches its family among the families,
its shape among the shapes of the family, ..., its leaf among its siblings, which differ only
in what the parent does not say (the hard negatives a flat classifier rarely sees). At
inference the path's log-probability (``log p(leaf) = sum of log p(node | parent)``) scores
the column. Name words keep their sigmoid.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cqdino.utils.text import name_tokens, word_vocabulary

TREE_TOKEN_PREFIX = "tree:"  # cqdino.data.build.category_words' tree tokens

__all__ = ["NameWordHead"]


class NameWordHead(nn.Module):
    """``Linear(embed_dim, W)`` word logits and the ``[C, W]`` word targets of the C names.

    The bias of word w starts at the log-odds of its frequency among the C names (clamped to
    [1e-3, 0.5]), so the loss starts near the entropy of the word distribution instead of at a
    large value that would dominate the first iterations.

    Args:
        category_names: the C category names in model (contiguous) order, or their token
            lists (:func:`cqdino.data.build.category_words`).
        embed_dim: query width D.
        tree_softmax: the tree tokens are a hierarchy of softmax groups (module docstring);
            needs tree tokens.
    """

    def __init__(self, category_names: Sequence[str], embed_dim: int, tree_softmax: bool = False):
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
        self.tree_softmax = bool(tree_softmax)
        if self.tree_softmax:
            group = self._tree_groups(category_names, self.words)
            with torch.no_grad():  # softmax groups start uniform
                self.linear.bias[group >= 0] = 0.0
            self.register_buffer("word_groups", group, persistent=False)

    @staticmethod
    def _tree_groups(category_names, words) -> Tensor:
        """``[W]`` softmax group of each tree token (the index of its parent token, or ``W``
        for the top level), -1 for a name word."""
        index = {w: i for i, w in enumerate(words)}
        group = torch.full((len(words),), -1, dtype=torch.long)
        for name in category_names:
            parent = len(words)  # the top-level group
            for tok in name_tokens(name):
                if not tok.startswith(TREE_TOKEN_PREFIX):
                    continue
                i = index[tok]
                if group[i] < 0:  # a node of several parents stays in its first group
                    group[i] = parent
                parent = i
        if not (group >= 0).any():
            raise ValueError(
                "NameWordHead(tree_softmax=True) needs tree tokens in the category words (e.g. "
                "category_words(..., tree=True))"
            )
        return group

    def group_log_probs(self, logits: Tensor) -> Tensor:
        """Word logits ``[..., W]`` -> per tree token ``log p(token | its parent)`` (a
        log-softmax over its group), name words unchanged; float32 or wider."""
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        tree = self.word_groups >= 0
        groups = torch.where(tree, self.word_groups, torch.zeros_like(self.word_groups))
        flat = x.reshape(-1, x.shape[-1])
        m = flat.detach().masked_fill(~tree, float("-inf")).amax(-1, keepdim=True)
        e = torch.exp(flat - m) * tree
        sums = e.new_zeros(flat.shape[0], self.num_words + 1).index_add_(1, groups, e)
        lse = torch.log(sums.gather(1, groups.expand_as(flat)).clamp_min(1e-30)) + m
        out = torch.where(tree, flat - lse, flat)
        return out.reshape(x.shape)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Summed word loss of matched queries: ``logits``/``targets`` ``[N, W]`` (multi-hot
        targets). Binary cross-entropy per word; with ``tree_softmax``, the tree tokens'
        cross-entropy over their groups instead (``-sum of log p(node | parent)`` on the
        path)."""
        targets = targets.to(logits.dtype)
        if not self.tree_softmax:
            return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        tree = self.word_groups >= 0
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        ce = -(self.group_log_probs(logits) * targets)
        return torch.where(tree, ce.to(bce.dtype), bce).sum()

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
        if self.tree_softmax:  # log p(path) for tree tokens, logits for name words
            logits = self.group_log_probs(logits).to(logits.dtype)
        if columns is None:
            scores = logits @ self.word_targets.T.to(logits.dtype)
        else:
            words = self.word_targets[columns].to(logits.dtype)  # (B, K, W)
            scores = torch.einsum("bqw,bkw->bqk", logits, words)
        return torch.log_softmax(scores, dim=-1)

    def targets(self, classes: Tensor) -> Tensor:
        """Dataset classes ``[G]`` -> multi-hot word targets ``[G, W]``."""
        return self.word_targets[classes.long()]

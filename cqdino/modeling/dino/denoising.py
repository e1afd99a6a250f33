"""Contrastive denoising (CDN) queries of DINO.

Each DN group holds, for every GT of an image, one *positive* query (box jittered by less than
half its size, to be reconstructed) and one *negative* query (jittered by between one and two
half-sizes, to be classified as background). Labels are flipped to random labels with
probability ``label_noise_ratio / 2``. The number of groups is dynamic: ``dn_number // max_G``
(at least 1) where ``max_G`` is the largest GT count in the batch. Groups are padded to
``2 * max_G`` queries; padded queries are never supervised.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["CDNGenerator"]


class CDNGenerator(nn.Module):
    """Builds the DN queries, their reference boxes and the self-attention mask.

    Args:
        num_labels: rows of the label-embedding table (``ClassHead.num_dn_labels``).
        num_noise_labels: label noise draws from ``[0, num_noise_labels)``.
        embed_dim: query width.
        dn_number: total DN queries per image budget (positives + negatives count once each
            per pair, as in DINO: ``groups = dn_number // max_G``).
        label_noise_ratio: probability (times 1/2) of replacing a DN label.
        box_noise_scale: scale of the box jitter relative to half the box size.
    """

    def __init__(
        self,
        num_labels: int,
        num_noise_labels: int,
        embed_dim: int = 256,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        super().__init__()
        self.label_embed = nn.Embedding(num_labels, embed_dim)
        self.num_noise_labels = num_noise_labels
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale

    def forward(
        self, labels: List[Tensor], boxes: List[Tensor], num_queries: int
    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Dict]]:
        """
        Args:
            labels: per image ``[G_i]`` int64 rows of the label table.
            boxes: per image ``[G_i, 4]`` normalised cxcywh GT boxes.
            num_queries: number of matching queries that follow the DN queries.

        Returns:
            ``(content [B, N_dn, D], ref_logits [B, N_dn, 4] (inverse-sigmoid boxes),
            attn_mask [N_dn + num_queries]^2 bool (True = blocked), dn_meta)``, or four Nones
            when DN is off or the batch has no GT. ``dn_meta`` has ``num_dn`` (N_dn),
            ``num_groups`` and ``indices``: per image ``(dn_query_idx, target_idx)`` of the
            positive queries.
        """
        counts = [len(b) for b in boxes]
        max_g = max(counts, default=0)
        if self.dn_number <= 0 or max_g == 0:
            return None, None, None, None
        groups = max(self.dn_number // max_g, 1)
        group_size = 2 * max_g
        num_dn = groups * group_size
        device = self.label_embed.weight.device
        B, D = len(boxes), self.label_embed.embedding_dim

        content = self.label_embed.weight.new_zeros(B, num_dn, D)
        ref = torch.zeros(B, num_dn, 4, device=device)
        indices = []
        for b, (lab, box) in enumerate(zip(labels, boxes)):
            g = len(box)
            if g == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=device)
                indices.append((empty, empty.clone()))
                continue
            # query slot of GT j, group k: positive k*group_size + j, negative + max_g
            offs = torch.arange(groups, device=device)[:, None] * group_size
            pos_slots = (offs + torch.arange(g, device=device)).flatten()  # (groups*g)
            neg_slots = pos_slots + max_g
            slots = torch.cat([pos_slots, neg_slots])

            lab = lab.repeat(2 * groups)
            flip = torch.rand(lab.shape, device=device) < self.label_noise_ratio * 0.5
            noise = torch.randint_like(lab, 0, self.num_noise_labels)
            lab = torch.where(flip, noise, lab)

            box = box.float().repeat(2 * groups, 1)
            xyxy = box_cxcywh_to_xyxy(box)
            half = torch.cat([box[:, 2:], box[:, 2:]], dim=1) / 2
            mag = torch.rand_like(box)  # positives: [0, 1), negatives: [1, 2)
            mag[groups * g :] += 1.0
            sign = torch.randint_like(box, 0, 2) * 2.0 - 1.0
            xyxy = (xyxy + sign * mag * half * self.box_noise_scale).clamp(0.0, 1.0)
            noised = box_xyxy_to_cxcywh(xyxy)

            content[b, slots] = self.label_embed(lab)
            ref[b, slots] = inverse_sigmoid(noised)
            target_idx = torch.arange(g, device=device).repeat(groups)
            indices.append((pos_slots, target_idx))

        total = num_dn + num_queries
        mask = torch.zeros(total, total, dtype=torch.bool, device=device)
        mask[num_dn:, :num_dn] = True  # matching queries do not see DN queries
        for k in range(groups):
            s, e = k * group_size, (k + 1) * group_size
            mask[s:e, :s] = True  # nor does a group see the others
            mask[s:e, e:num_dn] = True
        meta = {"num_dn": num_dn, "num_groups": groups, "indices": indices}
        return content, ref, mask, meta

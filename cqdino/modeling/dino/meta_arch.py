"""DINO as a detectron2 meta-architecture, with the classification head as a swappable module
(:mod:`cqdino.modeling.dino.heads`) so CQ-DINO subclasses it and replaces only what differs."""

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from .backbone import ConvPaddingZeroer
from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .criterion import SetCriterion
from .denoising import CDNGenerator
from .heads import ClassHead, ClassHeadState, LinearClassHead
from .matcher import HungarianMatcher
from .neck import ChannelMapper
from .position_encoding import PositionEmbeddingSine
from .transformer import DeformableDecoder, DeformableEncoder, DINOTransformer

__all__ = ["DINO"]


@META_ARCH_REGISTRY.register()
class DINO(nn.Module):
    """DINO (Zhang et al., 2022): deformable DETR with contrastive denoising, mixed query
    selection and look-forward-twice; two-stage, 4 levels.

    Distributed training (DDP policy): every parameter receives a gradient in every step, so
    ``find_unused_parameters=False`` works. Images without GT still produce the focal loss
    (all-background targets) and zero-sized box sums, which keep the box branches in the graph;
    a batch without any GT has no DN queries, and the DN loss keys are then emitted as zeros
    multiplied into the DN label table (same keys on every rank, no unused parameters).
    Exception: with fewer valid encoder positions than ``num_queries`` (tiny images) only the
    first ``k`` learned content queries are used.

    Subclassing (CQ-DINO): override :meth:`prepare_class_state` (or put the logic in the
    class head's ``prepare``), pass a different ``class_head`` and the transformer hooks;
    nothing else needs copying.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: ChannelMapper,
        position_embedding: nn.Module,
        transformer: DINOTransformer,
        class_head: ClassHead,
        criterion: SetCriterion,
        pixel_mean: Tuple[float, float, float],
        pixel_std: Tuple[float, float, float],
        input_format: str = "BGR",
        # Denoising:
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        # Inference:
        select_box_nums_for_evaluation: int = 300,
        size_divisibility: int = 0,
        zero_backbone_padding: bool = True,
        word_head: Optional[nn.Module] = None,
        word_score_weight: float = 0.0,
    ):
        """
        Args:
            backbone: detectron2 backbone returning the levels the neck reads.
            neck: maps backbone levels to ``transformer.embed_dim`` channels (+ extra levels).
            position_embedding: padding mask ``[B, H, W]`` -> ``[B, D, H, W]``.
            transformer: :class:`DINOTransformer`.
            class_head: :class:`ClassHead` (``LinearClassHead(num_classes)`` for DINO).
            criterion: :class:`SetCriterion`.
            pixel_mean, pixel_std: input normalisation, in the channel order of the inputs.
            input_format: channel order of the input images and of ``pixel_mean``/``pixel_std``,
                "BGR" (detectron2's default) or "RGB"; the dataset mapper must produce it.
            dn_number: DN query budget per image (0 disables DN); label_noise_ratio,
                box_noise_scale: CDN noise (see :class:`CDNGenerator`). The DN label table
                is sized by ``class_head.num_dn_labels``.
            select_box_nums_for_evaluation: detections kept per image (top query x class
                pairs).
            size_divisibility: pad images to a multiple of this (at least the backbone's).
            zero_backbone_padding: zero the padded region after every conv of the backbone
                (:class:`~cqdino.modeling.dino.backbone.ConvPaddingZeroer`), so with the masked
                neck and transformer an image's detections do not depend on the batch it is in
                (exact for CNN backbones in inference).
            word_head: optional :class:`~cqdino.modeling.dino.word_head.NameWordHead`: in
                training the matched queries of every decoder layer, of the DN groups
                and of the encoder proposals also predict the words of their GT's name (the
                criterion's ``loss_word``).
            word_score_weight: with a word head, add this times the word model's
                log-posterior over the logit columns
                (:meth:`~cqdino.modeling.dino.word_head.NameWordHead.column_log_probs`) to the
                last layer's logits at inference (0: the words are a training loss only).
        """
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f'input_format must be "RGB" or "BGR", got {input_format!r}')
        _check_neck_inputs(backbone, neck)
        self.input_format = input_format
        self.backbone = backbone
        self.neck = neck
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.class_head = class_head
        self.criterion = criterion
        self._class_state_observers: List[Callable[[ClassHeadState], None]] = []
        if word_head is not None and not isinstance(word_head, nn.Module):
            raise TypeError(
                f"model.word_head must be a module (e.g. NameWordHead) or None, got "
                f"{type(word_head).__name__} {word_head!r} (to turn it off from the command "
                "line write model.word_head=null)"
            )
        if word_score_weight < 0 or (word_score_weight and word_head is None):
            raise ValueError(
                f"word_score_weight={word_score_weight} needs a word_head and must be >= 0 "
                "(set model.word_head, or word_score_weight=0)"
            )
        self.word_head = word_head
        if word_head is not None and hasattr(word_head, "loss"):
            criterion.use_word_loss(word_head.loss)
        self.word_score_weight = float(word_score_weight)
        embed_dim = transformer.embed_dim
        self.dn_generator = (
            CDNGenerator(
                class_head.num_dn_labels,
                class_head.num_noise_labels,
                embed_dim,
                dn_number,
                label_noise_ratio,
                box_noise_scale,
            )
            if dn_number > 0
            else None
        )
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self._padding_zeroer = ConvPaddingZeroer(backbone) if zero_backbone_padding else None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DINO
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        return {
            "backbone": backbone,
            "neck": ChannelMapper(
                shapes,
                d.IN_FEATURES,
                d.HIDDEN_DIM,
                d.NUM_FEATURE_LEVELS - len(d.IN_FEATURES),
                d.NECK_GN_GROUPS,
            ),
            "position_embedding": PositionEmbeddingSine(d.HIDDEN_DIM // 2, offset=-0.5),
            "transformer": DINOTransformer(
                DeformableEncoder(
                    d.ENC_LAYERS,
                    d.HIDDEN_DIM,
                    d.NHEADS,
                    d.DIM_FEEDFORWARD,
                    d.NUM_FEATURE_LEVELS,
                    d.ENC_N_POINTS,
                    d.DROPOUT,
                    use_checkpoint=d.USE_CHECKPOINT,
                ),
                DeformableDecoder(
                    d.DEC_LAYERS,
                    d.HIDDEN_DIM,
                    d.NHEADS,
                    d.DIM_FEEDFORWARD,
                    d.NUM_FEATURE_LEVELS,
                    d.DEC_N_POINTS,
                    d.DROPOUT,
                ),
                d.NUM_FEATURE_LEVELS,
                d.NUM_QUERIES,
                d.HIDDEN_DIM,
            ),
            "class_head": LinearClassHead(d.NUM_CLASSES, d.HIDDEN_DIM, d.DEC_LAYERS),
            "criterion": SetCriterion(
                HungarianMatcher(
                    d.COST_CLASS, d.COST_BBOX, d.COST_GIOU, d.FOCAL_ALPHA, d.FOCAL_GAMMA
                ),
                loss_class_weight=d.CLASS_WEIGHT,
                loss_bbox_weight=d.BBOX_WEIGHT,
                loss_giou_weight=d.GIOU_WEIGHT,
                focal_alpha=d.FOCAL_ALPHA,
                focal_gamma=d.FOCAL_GAMMA,
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "dn_number": d.DN_NUMBER,
            "label_noise_ratio": d.LABEL_NOISE_RATIO,
            "box_noise_scale": d.BOX_NOISE_SCALE,
            "select_box_nums_for_evaluation": d.NUM_SELECT,
            "size_divisibility": d.SIZE_DIVISIBILITY,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict[str, Tensor]]) -> ImageList:
        """Normalise, then pad with zeros (bottom/right, to a multiple of
        ``size_divisibility``) and batch; padding is masked downstream. Sizes are taken from
        the Python shapes (detectron2's ``ImageList.from_tensors`` reads them back from
        tensors)."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
        d = self.size_divisibility
        if d > 1:
            H, W = -(-H // d) * d, -(-W // d) * d
        batched = images[0].new_zeros(len(images), images[0].shape[0], H, W)
        for im, out in zip(images, batched):
            out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return ImageList(batched, sizes)

    def prepare_targets(self, gt_instances: List[Instances]) -> List[Dict[str, Tensor]]:
        """Instances -> ``{"classes": [G] dataset classes, "boxes": [G, 4]}`` with boxes as
        cxcywh normalised by the image's (unpadded) size."""
        targets = []
        for inst in gt_instances:
            h, w = inst.image_size
            x0, y0, x1, y1 = inst.gt_boxes.tensor.to(self.device).float().unbind(-1)
            # Python scalars: no host-to-device copy of a scale tensor (a sync on accelerators)
            boxes = box_xyxy_to_cxcywh(torch.stack([x0 / w, y0 / h, x1 / w, y1 / h], -1))
            targets.append({"classes": inst.gt_classes.to(self.device), "boxes": boxes})
        return targets

    def prepare_class_state(
        self,
        features: Dict[str, Tensor],
        images: ImageList,
        targets: Optional[List[Dict[str, Tensor]]],
    ) -> ClassHeadState:
        """Per-batch classification state, before the encoder (CQ-DINO: category selection)."""
        gt_classes = [t["classes"] for t in targets] if targets is not None else None
        return self.class_head.prepare(features, images.image_sizes, gt_classes)

    @contextmanager
    def observe_class_state(self, fn: Callable[[ClassHeadState], None]) -> Iterator[None]:
        """Within the block, ``fn(state)`` sees the class-head state of every forward (e.g.
        CQ-DINO's selected categories ``state.indices``, for diagnostics); nothing changes."""
        self._class_state_observers.append(fn)
        try:
            yield
        finally:
            self._class_state_observers.remove(fn)

    def extract_features(
        self, batched_inputs: List[Dict[str, Tensor]]
    ) -> Tuple[ImageList, Optional[List[Dict[str, Tensor]]], Dict[str, Tensor], ClassHeadState]:
        """The part of the forward shared by DINO and CQ-DINO's stage 1: padded images, targets
        (training only), backbone features and the class-head state.

        A backbone without trainable parameters runs without autograd (no activations kept).
        """
        images = self.preprocess_image(batched_inputs)
        targets = None
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError(
                    f"{type(self).__name__} training needs 'instances' in every input dict"
                )
            targets = self.prepare_targets([x["instances"] for x in batched_inputs])
        if self._padding_zeroer is not None:
            self._padding_zeroer.set(images.image_sizes, tuple(images.tensor.shape[-2:]))
        grad = any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            features = self.backbone(images.tensor)
        state = self.prepare_class_state(features, images, targets)
        for fn in self._class_state_observers:  # after any subclass's prepare_class_state
            fn(state)
        return images, targets, features, state

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """
        Args:
            batched_inputs: detectron2's list of dicts (``image`` ``[3, H, W]``, ``instances``
                in training, optional ``height``/``width`` for the output resolution).

        Returns:
            training: dict of weighted ``loss_*`` scalars (criterion + class head extras);
            inference: ``[{"instances": Instances}]`` with ``pred_boxes``, ``scores``,
            ``pred_classes`` (at most ``select_box_nums_for_evaluation`` per image).
        """
        images, targets, features, state = self.extract_features(batched_inputs)
        maps, masks = self.neck(features, images.image_sizes)
        pos = [self.position_embedding(m).to(maps[0].dtype) for m in masks]

        dn = (None, None, None, None)
        if self.training:
            labels = self.class_head.map_targets([t["classes"] for t in targets], state)
            for t, lab in zip(targets, labels):
                t["labels"] = lab
            if self.dn_generator is not None:
                dn = self.dn_generator(
                    [self.class_head.map_dn_labels(lab) for lab in labels],
                    [t["boxes"] for t in targets],
                    self.transformer.num_queries,
                )
        dn_content, dn_ref, dn_mask, dn_meta = dn

        hidden, boxes, enc_outputs, state = self.transformer(
            maps, masks, pos, self.class_head, state, dn_content, dn_ref, dn_mask
        )
        logits = [self.class_head(h, state, i) for i, h in enumerate(hidden)]
        num_dn = dn_meta["num_dn"] if dn_meta is not None else 0
        layers = [
            {"pred_logits": lg[:, num_dn:], "pred_boxes": bx[:, num_dn:]}
            for lg, bx in zip(logits, boxes)
        ]

        if not self.training:
            last = self.add_word_scores(layers[-1]["pred_logits"], hidden[-1][:, num_dn:], state)
            return self.inference(dict(layers[-1], pred_logits=last), state, images, batched_inputs)

        enc_hidden = enc_outputs.pop("hidden")  # the proposals' features (training only)
        dn_layers = [
            {"pred_logits": lg[:, :num_dn], "pred_boxes": bx[:, :num_dn]}
            for lg, bx in zip(logits, boxes)
        ]
        if self.word_head is not None:
            for t in targets:
                t["words"] = self.word_head.targets(t["classes"])
            for h, out, dn_out in zip(hidden, layers, dn_layers):
                words = self.word_head(h)
                out["pred_words"], dn_out["pred_words"] = words[:, num_dn:], words[:, :num_dn]
            enc_outputs["pred_words"] = self.word_head(enc_hidden)
        outputs = dict(layers[-1], aux_outputs=layers[:-1], enc_outputs=enc_outputs)
        if dn_meta is not None:
            outputs["dn_outputs"] = dn_layers
        losses = self.criterion(outputs, targets, dn_meta)
        if self.dn_generator is not None and dn_meta is None:
            losses.update(self._zero_dn_losses(len(layers)))
        losses.update(state.losses)
        return losses

    def add_word_scores(self, logits: Tensor, hidden: Tensor, state: ClassHeadState) -> Tensor:
        """Inference logits ``[B, Q, N_col]`` of the last decoder layer plus
        ``word_score_weight`` times the word head's log-posterior over the columns (computed
        from the layer's query features ``hidden [B, Q, D]``); unchanged without it."""
        if not self.word_score_weight:
            return logits
        words = self.word_head.column_log_probs(hidden, state.indices)
        return logits + self.word_score_weight * words

    def _zero_dn_losses(self, num_layers: int) -> Dict[str, Tensor]:
        """DN loss keys for a batch without GT: zeros tied to the DN label table, so every rank
        reports the same keys and DDP sees the table used."""
        zero = self.dn_generator.label_embed.weight.sum() * 0.0
        keys = ("loss_class", "loss_bbox", "loss_giou")
        if self.word_head is not None:
            keys += ("loss_word",)
        out = {}
        for i in range(num_layers):
            suffix = "_dn" if i == num_layers - 1 else f"_dn_{i}"
            for k in keys:
                out[k + suffix] = zero
        return out

    @torch.no_grad()
    def inference(
        self,
        outputs: Dict[str, Tensor],
        state: ClassHeadState,
        images: ImageList,
        batched_inputs: List[Dict[str, Tensor]],
    ) -> List[Dict[str, Instances]]:
        """:meth:`select_detections`; boxes scaled to the input size, then to the requested
        output size with ``detector_postprocess``."""
        boxes, scores, classes, queries = self.select_detections(outputs, state, with_queries=True)
        results = []
        for b, (h, w) in enumerate(images.image_sizes):
            inst = Instances((h, w))
            scale = boxes.new_tensor([w, h, w, h])
            inst.pred_boxes = Boxes(boxes[b] * scale)
            inst.scores = scores[b]
            inst.pred_classes = classes[b]
            inst.pred_query = queries[b]  # the object query behind each detection
            height = batched_inputs[b].get("height", h)
            width = batched_inputs[b].get("width", w)
            result = {"instances": detector_postprocess(inst, height, width)}
            if state.ranking is not None:  # CQ-DINO: the selector's ranking, for ARC@K
                result["category_ranking"] = state.ranking[b]
                result["num_selected"] = state.indices.shape[1]
            results.append(result)
        return results

    def select_detections(
        self, outputs: Dict[str, Tensor], state: ClassHeadState, with_queries: bool = False
    ) -> Tuple[Tensor, ...]:
        """Top ``select_box_nums_for_evaluation`` (query, column) pairs per image by sigmoid
        score, columns mapped to dataset classes by the class head. Tensors only (no loop over
        images: ``torch.export`` traces it as it is).

        Returns:
            ``boxes [B, k, 4]`` xyxy normalised to each image's valid size, ``scores [B, k]``
            (descending), ``classes [B, k]`` int64, ``k = min(select_box_nums, Q * N_col)``;
            with ``with_queries`` also ``queries [B, k]`` int64, the object query of each.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]  # (B, Q, N), (B, Q, 4)
        _, Q, N = logits.shape
        prob = logits.sigmoid().flatten(1)  # (B, Q * N)
        k = min(self.select_box_nums_for_evaluation, Q * N)
        scores, idx = prob.topk(k, dim=1)
        query = torch.div(idx, N, rounding_mode="floor")
        classes = self.class_head.columns_to_classes(idx % N, state)
        boxes = box_cxcywh_to_xyxy(boxes.gather(1, query[..., None].expand(-1, -1, 4)))
        if with_queries:
            return boxes, scores, classes, query
        return boxes, scores, classes


def _check_neck_inputs(backbone: Backbone, neck: nn.Module) -> None:
    """The neck's declared input shapes (``neck.input_shapes``, as a LazyConfig writes them)
    must be the backbone's output shapes; fail here, naming both config keys, rather than at
    the first forward with a convolution shape error."""
    declared: Optional[Dict[str, ShapeSpec]] = getattr(neck, "input_shapes", None)
    if declared is None:
        return
    actual = backbone.output_shape()
    for name, spec in declared.items():
        if name not in actual:
            raise ValueError(
                f"model.neck.in_features reads {name!r}, which the backbone does not output "
                f"(model.backbone gives {sorted(actual)}; see its out_features)"
            )
        for field in ("channels", "stride"):
            want, got = getattr(spec, field), getattr(actual[name], field)
            if want is not None and got is not None and want != got:
                raise ValueError(
                    f"model.neck.input_shapes.{name}.{field}={want} does not match the backbone: "
                    f"model.backbone outputs {name} with {field}={got} "
                    f"({type(backbone).__name__}.output_shape()); make the two agree"
                )

"""Deployable inference: a DINO / CQ-DINO detector as one ``torch.export`` program (optionally
packaged with AOTInductor) or as an ONNX model that runs in ONNX Runtime without custom ops.

The exported computation is :class:`ExportableDetector`: a padded image batch and the images'
valid sizes in, the ``select_box_nums_for_evaluation`` best (query, column) pairs per image out
(boxes in input pixels, scores, dataset classes), i.e. the model's inference path
(:meth:`DINO.forward` in eval mode) with the image sizes as a tensor instead of Python ints::

    images       float32 [B, 3, H, W]  pixel values (0-255) in model.input_format, padded at the
                                       bottom/right (the padding's content is ignored);
                                       H, W multiples of model.size_divisibility
    image_sizes  int64   [B, 2]        (h, w) of each image's valid region, 1 <= h <= H, w <= W
    ->
    boxes        float32 [B, N, 4]     xyxy in the input image's pixels, clipped to (w, h)
    scores       float32 [B, N]        sigmoid scores, descending
    classes      int64   [B, N]        contiguous dataset class ids (0 .. C-1)

with ``N = select_box_nums_for_evaluation`` (300). Eager ``model([dicts])`` returns the same
detections (``detector_postprocess`` at the input size also drops boxes of zero width or height
after clipping, which the fixed-size outputs keep).

The ONNX model is the same program with the two ``cqdino::`` ops written in standard ONNX
operators (:mod:`cqdino.layers.onnx_translations`, given to the exporter as its
``custom_translation_table``; the PyTorch model is not modified).

Nothing here is needed for training; ``onnx``/``onnxscript``/``onnxruntime`` are imported only
by the ONNX functions (``pip install -e .[export]``).
"""

import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import ImageList
from torch import Tensor, nn

from cqdino.modeling.cqdino.contrastive_head import ContrastiveClassHead
from cqdino.modeling.dino.heads import ClassHeadState
from cqdino.modeling.dino.meta_arch import DINO
from cqdino.modeling.dino.neck import level_masks
from cqdino.utils.io import InputError, atomic_save, check_not_inputs

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportableDetector",
    "size_limits",
    "pad_images",
    "check_output_path",
    "check_outputs_not_inputs",
    "export_program",
    "save_program",
    "load_program",
    "aoti_package",
    "export_onnx",
    "detections_per_image",
    "detections_match",
    "example_inputs",
]

INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "scores", "classes")


class ExportableDetector(nn.Module):
    """A DINO / CQ-DINO in eval mode as a function of tensors only (see the module doc for the
    inputs and outputs). It runs the model's own modules in the order of the model's inference
    forward; it holds the model, it does not copy or replace any part of it.

    One step is moved from run time to construction: CQ-DINO's refined category queries
    (``class_head.category_queries()``, ``[C, d]``: the embeddings through the projection, the
    tree aggregation or self-attention and the norm) depend on the weights only, not on the
    image, so they are computed here once and the program holds the result. The rest of
    ``ContrastiveClassHead.prepare`` (selector, top-K gather, token projection) runs per call
    as in eager inference. This also keeps the tree aggregation's sparse operator, which ONNX
    cannot express, out of the graph.
    """

    def __init__(self, model: DINO):
        super().__init__()
        if not isinstance(model, DINO):
            raise TypeError(
                f"ExportableDetector needs a DINO or CQDINO, got {type(model).__name__}"
            )
        self.model = model
        head = model.class_head
        if isinstance(head, ContrastiveClassHead):
            with torch.no_grad():
                self.register_buffer("category_queries", head.category_queries().detach())
        else:
            self.category_queries = None

    def _class_state(self, features: Dict[str, Tensor], x: Tensor, image_sizes: Tensor):
        m = self.model
        if self.category_queries is None:
            return m.prepare_class_state(features, ImageList(x, image_sizes), None)
        # ContrastiveClassHead.prepare at inference, with the precomputed category queries
        head = m.class_head
        feat = features[head.in_feature]
        mask = level_masks(image_sizes, tuple(feat.shape[-2:]), head.in_stride, feat.device)
        out = head.selector(self.category_queries, feat, mask, num_topk=head.test_topk)
        return ClassHeadState(indices=out.indices, embeddings=out.tokens)

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.model
        H, W = images.shape[-2:]
        # preprocess_image: normalise, zeros beyond each image's valid region
        x = (images - m.pixel_mean) / m.pixel_std
        x = x.masked_fill(level_masks(image_sizes, (H, W), 1, x.device)[:, None], 0.0)
        if m._padding_zeroer is not None:
            m._padding_zeroer.set(image_sizes, (H, W))
        features = m.backbone(x)
        state = self._class_state(features, x, image_sizes)
        maps, masks = m.neck(features, image_sizes)
        pos = [m.position_embedding(mask).to(maps[0].dtype) for mask in masks]
        hidden, boxes, _, state = m.transformer(maps, masks, pos, m.class_head, state)
        logits = m.class_head(hidden[-1], state, len(hidden) - 1)
        logits = m.add_word_scores(logits, hidden[-1], state)
        outputs = {"pred_logits": logits, "pred_boxes": boxes[-1]}
        boxes, scores, classes = m.select_detections(outputs, state)
        # inference + detector_postprocess at the input size: scale, clip to the image
        wh = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)[:, None]  # (B, 1, 4) w h w h
        boxes = torch.maximum(torch.minimum(boxes * wh, wh), torch.zeros_like(wh))
        return boxes, scores, classes


def _level_count(size: int, strides: Sequence[int]) -> int:
    return sum(math.ceil(size / s) ** 2 for s in strides)


def size_limits(model: DINO, max_size: int = 1344) -> Dict[str, int]:
    """The padded sizes an export accepts: multiples of ``divisibility`` (the model's
    ``size_divisibility``, at least the backbone's largest stride, so every backbone level is
    an exact fraction of the input) from the smallest square whose encoder has at least
    ``num_queries`` positions (the two-stage query selection keeps ``num_queries`` proposals;
    below that the query count would depend on the input size) up to ``max_size`` (rounded down
    to a multiple)."""
    strides = [s.stride for s in model.backbone.output_shape().values()]
    d = max([int(model.size_divisibility), 1] + strides)
    strides = list(model.neck.strides)
    nq = model.transformer.num_queries
    low = d
    while _level_count(low, strides) < nq:
        low += d
    high = (max_size // d) * d
    if high < low:
        raise ValueError(
            f"--max-size {max_size} is below the smallest input this model can be exported for "
            f"({low} px: {nq} queries need {nq} encoder positions at strides {strides})"
        )
    return {"divisibility": d, "min": low, "max": high}


def pad_images(images: Sequence[Tensor], size_divisibility: int) -> Tuple[Tensor, Tensor]:
    """``[3, h_i, w_i]`` images -> a zero-padded ``[B, 3, H, W]`` batch (H, W the largest sizes
    rounded up to ``size_divisibility``) and ``image_sizes [B, 2]`` int64: the exported model's
    inputs."""
    if not images:
        raise ValueError("pad_images: no images")
    d = max(int(size_divisibility), 1)
    H = -(-max(int(im.shape[-2]) for im in images) // d) * d
    W = -(-max(int(im.shape[-1]) for im in images) // d) * d
    batch = images[0].new_zeros(len(images), images[0].shape[0], H, W).float()
    for im, out in zip(images, batch):
        out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    sizes = torch.tensor([[int(im.shape[-2]), int(im.shape[-1])] for im in images])
    return batch, sizes


def check_output_path(
    path: str, suffix: str, overwrite: bool = False, option: str = "--output"
) -> None:
    """Fail fast (before any slow work) on an output path that cannot be written: wrong
    extension, an existing file without ``overwrite``, a directory, a missing or unwritable
    folder. Messages name ``option`` (the argument that gave ``path``)."""
    if not path.endswith(suffix):
        raise ValueError(f"{option} {path!r}: expected a {suffix} file for this format")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{option} {path!r} exists (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{option} {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path!r}: folder {folder!r} is not writable")


def check_outputs_not_inputs(outputs: Dict[str, str], inputs: Dict[str, str]) -> None:
    """Refuse (``InputError``, one line, also with ``--overwrite``) an output that is one of
    the inputs (the checkpoint, the config) or another output: the same path, a symbolic link
    to it or a hard link of it. ``outputs`` / ``inputs``: option name -> path (empty paths are
    skipped)."""
    ins = {path: option for option, path in inputs.items() if path}
    done: Dict[str, str] = {}
    for option, path in outputs.items():
        if not path:
            continue
        for src, src_option in list(ins.items()) + list(done.items()):
            try:
                check_not_inputs([path], [src], option)
            except InputError:
                raise InputError(
                    f"{option} {path!r} is the same file as {src_option}={src!r}: choose "
                    f"another {option} (an output never replaces an input or another output, "
                    "not even with --overwrite)"
                ) from None
        done[path] = option


def _save(path: str, save: Callable[[str], None], overwrite: bool) -> None:
    """:func:`cqdino.utils.io.atomic_save` with the output's extension on the temporary name
    (the exporters pick the format from it); no existing file is replaced unless
    ``overwrite``."""
    atomic_save(path, save, overwrite=overwrite, suffix=os.path.splitext(path)[1])


def example_inputs(limits: Dict[str, int], device) -> Tuple[Tensor, Tensor]:
    """Batch 2 at sizes above the minimum (sizes 0/1 and the bounds would be specialised)."""
    d = limits["divisibility"]
    H = min(limits["min"] + 2 * d, limits["max"])
    W = min(limits["min"] + 3 * d, limits["max"])
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, H, W, generator=gen) * 255).to(device)
    sizes = torch.tensor([[H, W - d // 2], [H - d // 2, W]], device=device)
    return images, sizes


def export_program(
    model: DINO, max_size: int = 1344, max_batch: int = 64
) -> Tuple[torch.export.ExportedProgram, Dict[str, Any]]:
    """``torch.export`` of :class:`ExportableDetector` with a dynamic batch (1..``max_batch``)
    and dynamic padded height/width (multiples of the size divisibility, see
    :func:`size_limits`). The model must be in eval mode. Returns the program and a dict
    describing its inputs (what :func:`save_program` stores next to it)."""
    if model.training:
        raise ValueError("export_program: put the model in eval mode first (model.eval())")
    from torch.export import Dim

    limits = size_limits(model, max_size)
    d = limits["divisibility"]
    batch = Dim("batch", min=1, max=max_batch)
    h = Dim("h", min=limits["min"] // d, max=limits["max"] // d)
    w = Dim("w", min=limits["min"] // d, max=limits["max"] // d)
    dynamic = {"images": {0: batch, 2: d * h, 3: d * w}, "image_sizes": {0: batch}}
    example = example_inputs(limits, model.device)
    with torch.no_grad():
        program = torch.export.export(
            ExportableDetector(model).eval(), example, dynamic_shapes=dynamic, strict=False
        )
    info = {
        "format": "cqdino-detector",
        "meta_architecture": type(model).__name__,
        "inputs": {
            "images": "float32 [B, 3, H, W] pixels 0-255, padded bottom/right",
            "image_sizes": "int64 [B, 2] (h, w) valid region",
        },
        "outputs": {
            "boxes": "float32 [B, N, 4] xyxy input pixels",
            "scores": "float32 [B, N]",
            "classes": "int64 [B, N] contiguous class ids",
        },
        "input_format": model.input_format,
        "size_divisibility": d,
        "min_size": limits["min"],
        "max_size": limits["max"],
        "max_batch": max_batch,
        "detections_per_image": detections_per_image(model),
        "num_classes": int(model.class_head.num_classes),
    }
    return program, info


def detections_per_image(model: DINO) -> int:
    """Detections per image of the exported model (``N``)."""
    head = model.class_head
    columns = getattr(head, "test_topk", None) or getattr(head, "num_topk", None)
    columns = columns or head.num_classes
    return min(model.select_box_nums_for_evaluation, model.transformer.num_queries * columns)


def save_program(
    program: torch.export.ExportedProgram, path: str, info: Dict, overwrite: bool = False
) -> None:
    """Atomically write ``program`` to ``path`` (``.pt2``), with ``info`` as ``cqdino.json``
    inside the archive."""
    extra = {"cqdino.json": json.dumps(info, indent=1)}
    _save(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra), overwrite)


def load_program(path: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` with the ``cqdino::`` ops registered (``cqdino._C``: the compiled
    kernels, not the model's Python code)."""
    from cqdino import _ext

    if not _ext.has_ext():
        raise RuntimeError(f"loading {path}: its cqdino:: ops need cqdino._C ({_ext.IMPORT_ERROR})")
    return torch.export.load(path)


def aoti_package(
    program: torch.export.ExportedProgram,
    path: str,
    overwrite: bool = False,
    info: Optional[Dict] = None,
) -> None:
    """Compile ``program`` ahead of time with AOTInductor into a ``.pt2`` package (load with
    ``torch._inductor.aoti_load_package`` after importing ``cqdino._C``; the custom ops run
    through the proxy executor). ``info`` goes into the package's metadata (key ``cqdino``,
    ``aoti_load_package(path).get_metadata()``)."""
    from torch._inductor import aoti_compile_and_package

    configs = {"aot_inductor.metadata": {"cqdino": json.dumps(info)}} if info else None

    def save(tmp: str) -> None:
        aoti_compile_and_package(program, package_path=tmp, inductor_configs=configs)

    _save(path, save, overwrite)


def export_onnx(
    program: torch.export.ExportedProgram,
    path: str,
    info: Optional[Dict] = None,
    overwrite: bool = False,
    opset: Optional[int] = None,
    msda_form: str = "grid",
) -> None:
    """Write ``program`` as an ONNX model (standard operators only, opset
    :data:`cqdino.layers.onnx_translations.OPSET`) to ``path``, atomically. ``info`` goes into
    the model's ``metadata_props`` (key ``cqdino``). ``msda_form``: the deformable attention's
    ONNX form (:func:`cqdino.layers.onnx_translations.translation_table`)."""
    from cqdino.layers.onnx_translations import OPSET, translation_table

    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        custom_translation_table=translation_table(msda_form),
        opset_version=opset or OPSET,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        # onnxscript 0.7.2's rewriter (FuseMaxMinToClip) emits a Clip whose bounds are not
        # defined in the graph for our box clamps; ONNX Runtime optimises the graph itself
        optimize=False,
        verbose=False,
    )
    model = onnx_program.model
    if info is not None:
        model.metadata_props["cqdino"] = json.dumps(info)
    _save(path, lambda tmp: onnx_program.save(tmp, external_data=False), overwrite)


def detections_match(
    expected: Sequence[Tuple[Tensor, Tensor, Tensor]],
    actual: Sequence[Tuple[Tensor, Tensor, Tensor]],
    image_sizes: Tensor,
    box_tol: float = 1e-3,
    score_tol: float = 1e-4,
) -> List[str]:
    """Compare per-image detections ``(boxes [N, 4], scores [N], classes [N])`` as matched
    sets, not rank by rank: every expected detection needs its own twin among the actual ones
    (one-to-one), with the same class, a score within ``score_tol`` and a box within
    ``box_tol`` x the image's longer side. The order is not compared, so detections whose
    scores tie (an untrained model scores many pairs a few 1e-8 apart) may come in either
    order. Actual detections left without a twin may only be boxes that are empty after
    clipping (width or height within the box tolerance of 0): eager ``detector_postprocess``
    drops those, the fixed-size exported outputs keep them. Returns the mismatches found
    (empty when they agree)."""
    from scipy.optimize import linear_sum_assignment

    errors = []
    for i, ((eb, es, ec), (ab, as_, ac)) in enumerate(zip(expected, actual)):
        h, w = (int(v) for v in image_sizes[i])
        eb, es, ab, as_ = (t.detach().double().cpu() for t in (eb, es, ab, as_))
        ec, ac = ec.cpu(), ac.cpu()
        score_err = (es[:, None] - as_[None]).abs()  # (N, M)
        box_err = (eb[:, None] - ab[None]).abs().amax(-1) / max(h, w)
        ok = (ec[:, None] == ac[None]) & (score_err <= score_tol) & (box_err <= box_tol)
        # one-to-one: the largest set of twins (infeasible pairs cost more than any matching)
        cost = torch.where(ok, score_err / score_tol + box_err / box_tol, len(es) * 4.0 + 4.0)
        rows, cols = linear_sum_assignment(cost.numpy()) if len(es) and len(as_) else ([], [])
        pairs = [(r, c) for r, c in zip(rows, cols) if ok[r, c]]
        twinned = {r for r, _ in pairs}
        missing = [r for r in range(len(es)) if r not in twinned]
        if missing:
            r = missing[0]
            near = score_err[r] + torch.where(ec[r] == ac, 0.0, 1.0)
            c = int(near.argmin()) if len(as_) else -1
            detail = (
                f"class {int(ac[c])} score {float(as_[c]):.6f} box error "
                f"{float(box_err[r, c]):.1e} of the image size"
                if c >= 0
                else "none"
            )
            errors.append(
                f"image {i}: {len(missing)} of {len(es)} eager detections have no twin "
                f"(class, score within {score_tol}, box within {box_tol} of the image size); "
                f"the first, rank {r} (class {int(ec[r])}, score {float(es[r]):.6f}), is "
                f"nearest to {detail}"
            )
        used = {c for _, c in pairs}
        extra = [c for c in range(len(as_)) if c not in used]
        if extra:
            size = ab[extra, 2:] - ab[extra, :2]  # (E, 2) width, height
            not_empty = (size.amin(-1) > box_tol * max(h, w)).sum().item()
            if not_empty:
                errors.append(
                    f"image {i}: {not_empty} exported detections with a non-empty box have no "
                    "eager twin"
                )
    return errors

"""Detections for applications: ``Predictor(path)`` maps images to boxes, scores and class
names with the model's own preprocessing, from an exported file or a training checkpoint::

    from cqdino.predictor import Predictor

    predictor = Predictor("demo.onnx")                  # ONNX Runtime, no PyTorch model code
    predictor = Predictor("demo.pt2")                   # torch.export program or AOTInductor
    predictor = Predictor("model_final.pth", config_file="configs/demo.py")  # eager PyTorch
    for det in predictor(["a.jpg", pil_image, bgr_array], confidence=0.3):
        print(det.boxes, det.scores, det.names)

Every format runs the same computation, :class:`cqdino.export.ExportableDetector` (a padded
batch and the images' sizes in, the top detections per image out); the checkpoint form runs it
eagerly. What the model needs around it travels in the exported file's metadata (``cqdino``
JSON, written by ``tools/export.py``): the class names, the channel order
(``input_format``), the test resize of ``dataloader.test.mapper`` (shortest side
``test_size``, longest side <= ``test_max_size``), the size divisibility and the padded size
range. Images are read with their EXIF orientation, resized as the test mapper does
(detectron2's ``ResizeShortestEdge``, bilinear), padded into one batch, and the boxes are
mapped back to the pixels of the images as given (clipped; boxes empty after clipping are
dropped, as ``detector_postprocess`` does).

Inputs: a path, a ``PIL.Image`` or an ``(H, W, 3)`` uint8 array in ``array_format`` channel
order (``"BGR"`` by default, what ``cv2.imread`` returns; detectron2's ``DefaultPredictor``
convention), or a list of them (one batch).
"""

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["Detections", "Predictor", "read_metadata", "resize_shape", "deployment_info"]

ImageLike = Union[str, os.PathLike, np.ndarray, Any]  # Any: PIL.Image.Image

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pkl", ".ckpt")


@dataclass
class Detections:
    """The detections of one image, by decreasing score, in the image's own pixels."""

    boxes: np.ndarray  # (N, 4) float32 xyxy
    scores: np.ndarray  # (N,) float32
    classes: np.ndarray  # (N,) int64 contiguous class ids
    names: List[str]  # (N,) class names
    image_size: Tuple[int, int]  # (height, width) of the image as given

    def __len__(self) -> int:
        return len(self.scores)


def resize_shape(height: int, width: int, short_edge: int, max_size: int) -> Tuple[int, int]:
    """The size detectron2's ``ResizeShortestEdge(short_edge, max_size)`` gives an image of
    ``(height, width)``: shortest side ``short_edge``, the longest at most ``max_size``."""
    scale = short_edge / min(height, width)
    if height < width:
        new_h, new_w = float(short_edge), scale * width
    else:
        new_h, new_w = scale * height, float(short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def deployment_info(cfg, model, checkpoint: str = "") -> Dict[str, Any]:
    """What a deployed model needs besides its graph (merged into the export's ``cqdino``
    metadata by ``tools/export.py``): ``class_names`` (those saved in the checkpoint by
    ``train_net.py``, else the model's category names, else the training dataset's
    ``thing_classes``, else ``class <i>``), ``class_names_source``, ``test_size`` and
    ``test_max_size`` (``dataloader.test.mapper``; detectron2's 800 / 1333 without one)."""
    num_classes = int(model.class_head.num_classes)
    names, source = None, ""
    if checkpoint:
        from cqdino.engine.checkpoint import read_checkpoint_meta

        saved = read_checkpoint_meta(checkpoint).get("class_names")
        if saved is not None and len(saved) == num_classes:
            names, source = [str(n) for n in saved], f"checkpoint {checkpoint}"
    own = getattr(model.class_head, "category_names", None)
    if (
        names is None
        and own is not None
        and len(own) == num_classes
        and all(isinstance(n, str) for n in own)  # not token lists (category_words)
    ):
        names, source = [str(n) for n in own], "model.class_head.category_names"
    dataloader = cfg.get("dataloader") if hasattr(cfg, "get") else None
    if names is None and dataloader is not None and "train" in dataloader:
        dataset = dataloader.train.get("dataset")
        value = dataset.get("names") if dataset is not None else None
        if value:
            from cqdino.data.build import dataset_class_names

            name = value if isinstance(value, str) else list(value)[0]
            found = dataset_class_names(name, num_classes)
            if found is not None:
                names, source = found, f"dataset {name!r}"
    if names is None:
        names, source = [f"class {i}" for i in range(num_classes)], "numbered (none found)"
    mapper = None
    if dataloader is not None and "test" in dataloader:
        mapper = dataloader.test.get("mapper")
    test_size = int(mapper.get("test_size", 800)) if mapper is not None else 800
    test_max = int(mapper.get("max_size", 1333)) if mapper is not None else 1333
    return {
        "class_names": names,
        "class_names_source": source,
        "test_size": test_size,
        "test_max_size": test_max,
    }


def read_metadata(path: str) -> Dict[str, Any]:
    """The ``cqdino`` metadata of an exported file (``.onnx``: the model's ``metadata_props``;
    ``.pt2``: ``cqdino.json`` in a ``torch.export`` archive or the AOTInductor package's
    metadata), with ``"runtime"`` set to ``onnxruntime`` / ``export`` / ``aoti``."""
    if path.endswith(".onnx"):
        import onnx

        model = onnx.load(path, load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if "cqdino" not in props:
            raise ValueError(f"{path}: no 'cqdino' metadata (not written by tools/export.py)")
        return {**json.loads(props["cqdino"]), "runtime": "onnxruntime"}
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a .pt2 archive (torch.export / AOTInductor)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        aoti = any("/data/aotinductor/" in n for n in names)
        meta = [n for n in names if n.endswith("/extra/cqdino.json")]
        info = json.loads(z.read(meta[0])) if meta else None
    if aoti:
        return {"runtime": "aoti"} if info is None else {**info, "runtime": "aoti"}
    if info is None:
        raise ValueError(f"{path}: no cqdino.json inside (not written by tools/export.py)")
    return {**info, "runtime": "export"}


class Predictor:
    """Boxes, scores and class names of images, from one model file.

    Args:
        path: ``.onnx`` (ONNX Runtime), ``.pt2`` (``torch.export`` program or AOTInductor
            package; needs the compiled ``cqdino._C``), or a training checkpoint (``.pth``)
            with ``config_file``.
        config_file: the LazyConfig of a checkpoint (ignored for exported files).
        opts: ``key=value`` overrides of ``config_file``.
        device: ``"cpu"`` or ``"cuda"`` (ONNX Runtime: the CUDA execution provider).
        threads: intra-op threads (``torch.set_num_threads`` / ONNX Runtime's
            ``intra_op_num_threads``); None keeps the runtime's default.
        array_format: channel order of numpy inputs (``"BGR"`` or ``"RGB"``).
    """

    def __init__(
        self,
        path: str,
        config_file: Optional[str] = None,
        opts: Sequence[str] = (),
        device: str = "cpu",
        threads: Optional[int] = None,
        array_format: str = "BGR",
    ):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Predictor: {path!r}: no such file")
        if array_format not in ("BGR", "RGB"):
            raise ValueError(f"Predictor: array_format must be BGR or RGB, got {array_format!r}")
        self.path, self.device, self.array_format = path, device, array_format
        if path.endswith(".onnx"):
            self.info = read_metadata(path)
            self._run = self._onnx_runner(path, device, threads)
        elif path.endswith(".pt2"):
            self.info = read_metadata(path)
            self._run = self._torch_runner(path, device, threads)
        elif path.endswith(CHECKPOINT_SUFFIXES):
            if not config_file:
                raise ValueError(f"Predictor: {path!r} is a checkpoint: pass its config_file")
            self._run = self._checkpoint_runner(path, config_file, opts, device, threads)
        else:
            raise ValueError(
                f"Predictor: {path!r}: expected a .onnx, a .pt2 or a checkpoint "
                f"({', '.join(CHECKPOINT_SUFFIXES)}) with its config_file"
            )
        missing = [k for k in ("size_divisibility", "min_size", "max_size") if k not in self.info]
        if missing:
            raise ValueError(f"Predictor: {path!r}: metadata lacks {missing}")
        self.class_names: List[str] = list(
            self.info.get("class_names")
            or [f"class {i}" for i in range(int(self.info.get("num_classes", 0)))]
        )
        self.input_format: str = self.info.get("input_format", "BGR")
        self.test_size = int(self.info.get("test_size", 800))
        self.test_max_size = int(self.info.get("test_max_size", 1333))

    # --- runtimes: (images float32 [B, 3, H, W], sizes int64 [B, 2]) -> numpy outputs -----

    @staticmethod
    def _onnx_runner(path: str, device: str, threads: Optional[int]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(path, options, providers=providers)

        def run(images: np.ndarray, sizes: np.ndarray):
            return session.run(None, {"images": images, "image_sizes": sizes})

        return run

    def _torch_runner(self, path: str, device: str, threads: Optional[int]):
        import torch

        from cqdino import _ext

        if threads:
            torch.set_num_threads(int(threads))
        if not _ext.has_ext():
            raise RuntimeError(f"{path}: its cqdino:: ops need cqdino._C ({_ext.IMPORT_ERROR})")
        if self.info["runtime"] == "aoti":
            from torch._inductor import aoti_load_package

            module = aoti_load_package(path)
            saved = module.get_metadata().get("cqdino")
            if saved is None:
                raise ValueError(f"{path}: AOTInductor package without 'cqdino' metadata")
            self.info = {**json.loads(saved), "runtime": "aoti"}
        else:
            module = torch.export.load(path).module().to(device)
        return self._torch_call(module, device)

    @staticmethod
    def _torch_call(module, device: str):
        import torch

        def run(images: np.ndarray, sizes: np.ndarray):
            with torch.no_grad():
                out = module(
                    torch.from_numpy(images).to(device), torch.from_numpy(sizes).to(device)
                )
            return [t.cpu().numpy() for t in out]

        return run

    def _checkpoint_runner(self, path, config_file, opts, device, threads):
        import torch
        from detectron2.config import instantiate

        from cqdino.engine import load_weights_strict, use_ema_weights
        from cqdino.engine.config_check import load_config
        from cqdino.export import ExportableDetector, detections_per_image, size_limits

        if threads:
            torch.set_num_threads(int(threads))
        cfg = load_config(config_file, list(opts))
        model = instantiate(cfg.model)
        load_weights_strict(model, path, use_ema=use_ema_weights(cfg))
        model.to(device).eval()
        limits = size_limits(model, 1 << 30)
        self.info = {
            "runtime": "eager",
            "input_format": model.input_format,
            "size_divisibility": limits["divisibility"],
            "min_size": limits["min"],
            "max_size": limits["max"],
            "detections_per_image": detections_per_image(model),
            "num_classes": int(model.class_head.num_classes),
            **deployment_info(cfg, model, path),
        }
        return self._torch_call(ExportableDetector(model).eval(), device)

    # --- images in, detections out ---------------------------------------------------------

    def _rgb(self, image: ImageLike) -> np.ndarray:
        """(H, W, 3) uint8 RGB of a path, a PIL image or an array in ``array_format``."""
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image, ImageOps

            with Image.open(image) as im:
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"Predictor: expected an (H, W, 3) uint8 array, got {image.dtype} "
                    f"{tuple(image.shape)}"
                )
            return image[:, :, ::-1] if self.array_format == "BGR" else image
        if hasattr(image, "convert"):  # PIL
            return np.asarray(image.convert("RGB"))
        raise TypeError(f"Predictor: cannot read an image from a {type(image).__name__}")

    def preprocess(self, images: Sequence[ImageLike]):
        """``(batch float32 [B, 3, H, W], sizes int64 [B, 2], original (h, w) per image)``:
        resized as the test mapper does, in the model's channel order, padded."""
        from PIL import Image

        resized, originals = [], []
        for image in images:
            rgb = self._rgb(image)
            h, w = rgb.shape[:2]
            if h == 0 or w == 0:
                raise ValueError("Predictor: an image of size 0")
            originals.append((h, w))
            new_h, new_w = resize_shape(h, w, self.test_size, self.test_max_size)
            if (new_h, new_w) != (h, w):
                rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
            resized.append(rgb if self.input_format == "RGB" else rgb[:, :, ::-1])
        d = int(self.info["size_divisibility"])
        H = max(-(-max(r.shape[0] for r in resized) // d) * d, int(self.info["min_size"]))
        W = max(-(-max(r.shape[1] for r in resized) // d) * d, int(self.info["min_size"]))
        if max(H, W) > int(self.info["max_size"]):
            raise ValueError(
                f"Predictor: {self.path} accepts padded sides up to {self.info['max_size']} px, "
                f"these images need {H} x {W} (export with a larger --max-size)"
            )
        batch = np.zeros((len(resized), 3, H, W), np.float32)
        for out, r in zip(batch, resized):
            out[:, : r.shape[0], : r.shape[1]] = r.transpose(2, 0, 1)
        sizes = np.array([r.shape[:2] for r in resized], np.int64)
        return batch, sizes, originals

    def __call__(
        self, images: Union[ImageLike, Sequence[ImageLike]], confidence: float = 0.0
    ) -> Union[Detections, List[Detections]]:
        """Detections of one image (a :class:`Detections`) or of a list of images (a list, run
        as one batch), those with ``score >= confidence``."""
        single = not isinstance(images, (list, tuple))
        batch_in = [images] if single else list(images)
        if not batch_in:
            return []
        batch, sizes, originals = self.preprocess(batch_in)
        boxes, scores, classes = self._run(batch, sizes)
        results = []
        for i, (h, w) in enumerate(originals):
            rh, rw = (int(v) for v in sizes[i])
            b = boxes[i].astype(np.float32) * np.array([w / rw, h / rh] * 2, np.float32)
            b = np.minimum(np.maximum(b, 0.0), np.array([w, h, w, h], np.float32))
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (scores[i] >= confidence)
            c = classes[i][keep].astype(np.int64)
            results.append(
                Detections(
                    boxes=b[keep],
                    scores=scores[i][keep].astype(np.float32),
                    classes=c,
                    names=[self.class_names[k] for k in c.tolist()],
                    image_size=(h, w),
                )
            )
        return results[0] if single else results

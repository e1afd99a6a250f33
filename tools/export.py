#!/usr/bin/env python
"""Export a trained DINO / CQ-DINO for deployment: a ``torch.export`` program (``.pt2``,
optionally also an AOTInductor package) or an ONNX model (``.onnx``, standard operators only).

    python tools/export.py --config-file configs/demo.py --format onnx --output demo.onnx \\
        train.init_checkpoint=output/demo/model_final.pth
    python tools/export.py --config-file configs/v3det.py --format torch --output v3det.pt2 \\
        train.init_checkpoint=model_final.pth [--aoti v3det_aoti.pt2]

The exported model maps a padded image batch to the top detections per image (see
``cqdino/export.py`` and docs/export.md): inputs ``images`` float32 [B, 3, H, W] (pixel values
in the config's ``model.input_format``, padded at the bottom/right, H and W multiples of the
model's size divisibility, between the printed minimum and ``--max-size``) and ``image_sizes``
int64 [B, 2]; outputs ``boxes`` [B, N, 4] (xyxy, input pixels), ``scores`` [B, N],
``classes`` [B, N]. After writing, the tool runs the exported model on a 2-image batch and
compares it with the eager model (``--no-check`` skips that).

Load a ``.pt2`` with ``import cqdino._C; torch.export.load(path).module()`` (the compiled ops
must be registered; the model's Python code is not needed). The weights are loaded strictly
(every key present with its shape, nothing extra). An existing output is never replaced
without ``--overwrite``, and an output that is an input (the checkpoint, the config; also
through a symbolic or hard link) or the other output never, even with it; files are written to
a temporary name and renamed. The file's metadata carries the class names, the channel order
and the test resize, so ``cqdino.predictor.Predictor(path)`` and ``projects/demo.py --model``
run it without the config.
"""

import argparse
import logging
import os
import re
import sys
import time
from typing import List, Optional, Sequence

import torch

logger = logging.getLogger("cqdino.export")

_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)*=")
SUFFIX = {"torch": ".pt2", "onnx": ".onnx"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export a DINO / CQ-DINO to torch.export (.pt2) or ONNX (.onnx).",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument("--format", required=True, choices=sorted(SUFFIX), help="output format")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .pt2 / .onnx file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--max-size", type=int, default=1344, help="largest padded side accepted (default 1344)"
    )
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch (default 64)")
    parser.add_argument(
        "--aoti",
        metavar="FILE",
        help="(--format torch) also compile an AOTInductor package to this .pt2 file",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with eager")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="export without train.init_checkpoint (untrained weights: for latency tests only)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides key=value (LazyConfig keys)"
    )
    args = parser.parse_args(argv)
    if args.max_size <= 0 or args.max_batch <= 0:
        parser.error("--max-size and --max-batch must be positive")
    if args.aoti and args.format != "torch":
        parser.error("--aoti goes with --format torch")
    bad = [o for o in args.opts if not _OVERRIDE.match(o)]
    if bad:
        parser.error(f"unrecognised arguments {bad} (config overrides are key=value)")
    return args


def _check_onnx_packages() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(
            f"--format onnx needs {', '.join(missing)}: pip install -e .[export] "
            "(make install does it)"
        )


def _build(args):
    """Config, model (eval, CPU) with its weights: every check that needs no tracing."""
    from detectron2.config import LazyConfig, instantiate

    from cqdino.engine import load_weights_strict, use_ema_weights
    from cqdino.export import check_outputs_not_inputs, size_limits
    from cqdino.modeling import DINO

    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file!r}: no such file")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), list(args.opts))
    if "model" not in cfg:
        raise ValueError(f"--config-file {args.config_file!r} has no 'model'")
    checkpoint = cfg.train.get("init_checkpoint", "") if "train" in cfg else ""
    if not checkpoint and not args.random_weights:
        raise ValueError(
            "no train.init_checkpoint=... given (pass the trained weights; --random-weights "
            "exports untrained weights, for latency measurements)"
        )
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"train.init_checkpoint={checkpoint!r}: no such file")
    # an output is never one of the inputs, nor the other output (not even with --overwrite)
    check_outputs_not_inputs(
        {"--output": args.output, "--aoti": args.aoti or ""},
        {"--config-file": args.config_file, "train.init_checkpoint": checkpoint},
    )
    model = instantiate(cfg.model)
    if not isinstance(model, DINO):
        raise ValueError(
            f"--config-file {args.config_file!r}: model is a {type(model).__name__}, "
            "not a DINO / CQDINO"
        )
    if checkpoint:
        load_weights_strict(model, checkpoint, use_ema=use_ema_weights(cfg))
    size_limits(model, args.max_size)  # --max-size below the model's minimum: one line
    return cfg, model.to("cpu").eval(), checkpoint


def _check(args, model, info) -> List[str]:
    """Run the written file and the eager model on a 2-image batch and compare."""
    from cqdino.export import detections_match, example_inputs, load_program

    limits = {"divisibility": info["size_divisibility"], "min": info["min_size"]}
    limits["max"] = info["max_size"]
    images, sizes = example_inputs(limits, "cpu")
    with torch.no_grad():
        eager = model([{"image": images[i, :, :h, :w]} for i, (h, w) in enumerate(sizes.tolist())])
    expected = [
        (r["instances"].pred_boxes.tensor, r["instances"].scores, r["instances"].pred_classes)
        for r in eager
    ]
    if args.format == "torch":
        with torch.no_grad():
            boxes, scores, classes = load_program(args.output).module()(images, sizes)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(args.output, providers=["CPUExecutionProvider"])
        out = session.run(None, {"images": images.numpy(), "image_sizes": sizes.numpy()})
        boxes, scores, classes = (torch.from_numpy(o) for o in out)
    # matched as sets: scores that tie may come in either order, and eager drops the boxes
    # that are empty after clipping (the exported outputs keep them)
    actual = [(boxes[i], scores[i], classes[i]) for i in range(len(sizes))]
    return detections_match(expected, actual, sizes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cqdino.export import (
        aoti_package,
        check_output_path,
        export_onnx,
        export_program,
        save_program,
    )
    from cqdino.predictor import deployment_info

    try:
        check_output_path(args.output, SUFFIX[args.format], args.overwrite)
        if args.aoti:
            check_output_path(args.aoti, ".pt2", args.overwrite, option="--aoti")
        if args.format == "onnx":
            _check_onnx_packages()
        cfg, model, checkpoint = _build(args)
        extra_info = deployment_info(cfg, model, checkpoint)  # class names, test resize
        logger.info(
            f"{len(extra_info['class_names'])} class names from "
            f"{extra_info['class_names_source']} go into the file's metadata"
        )
    except (FileNotFoundError, FileExistsError, PermissionError, KeyError, ValueError) as e:
        logger.error(str(e).strip("'\""))
        return 1
    except RuntimeError as e:
        logger.error(str(e))
        return 1

    t0 = time.perf_counter()
    program, info = export_program(model, args.max_size, args.max_batch)
    info.update(extra_info)
    logger.info(
        f"traced {info['meta_architecture']} in {time.perf_counter() - t0:.0f} s: batch 1-"
        f"{info['max_batch']}, padded sides {info['min_size']}-{info['max_size']} px in steps "
        f"of {info['size_divisibility']}, {info['detections_per_image']} detections per image"
    )
    t0 = time.perf_counter()
    if args.format == "torch":
        save_program(program, args.output, info, args.overwrite)
    else:
        export_onnx(program, args.output, info, args.overwrite)
    size_mb = os.path.getsize(args.output) / 2**20
    logger.info(f"wrote {args.output} ({size_mb:.1f} MiB) in {time.perf_counter() - t0:.0f} s")
    if args.aoti:
        t0 = time.perf_counter()
        try:
            aoti_package(program, args.aoti, args.overwrite, info)
        except Exception as e:  # compiler missing or failing: name the option, keep one line
            first = (str(e).strip().splitlines() or [""])[0][:300]
            logger.error(
                f"--aoti {args.aoti}: AOTInductor compilation failed ({type(e).__name__}:"
                f" {first}); {args.output} was written"
            )
            return 1
        logger.info(f"wrote {args.aoti} (AOTInductor) in {time.perf_counter() - t0:.0f} s")
    if not args.no_check:
        errors = _check(args, model, info)
        if errors:
            logger.error(f"{args.output} does not reproduce the eager model: " + "; ".join(errors))
            return 2
        logger.info(f"checked: {args.output} reproduces the eager model on a 2-image batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())

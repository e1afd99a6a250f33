"""A synthetic vast-vocabulary detection dataset (the project's embedded default).

The command line of :func:`~cqdino.data.synthetic.generation.generate`
(``python -m cqdino.data.synthetic --help``, which prints the first line above, the package's
own, as its description): every argument is checked before any work, each error is one line
naming the argument.
"""

import argparse
import os
import random
import time
from typing import List, Optional

from cqdino.utils.io import InputError, check_output_dir

from .categories import CATEGORY_RANGE, MAX_CATEGORIES, NAME_STYLES, SHAPES
from .generation import DEMO_CONFIG, _sigterm_as_exit, check_replaceable, generate
from .workers import WorkerError


def main(argv: Optional[List[str]] = None) -> None:
    """Command line of :func:`generate` (``python -m cqdino.data.synthetic --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m cqdino.data.synthetic",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out",
        required=True,
        default=argparse.SUPPRESS,  # required: no default to show
        help="output folder, e.g. $DETECTRON2_DATASETS/synthetic_vocab",
    )
    p.add_argument(
        "--num-categories",
        type=int,
        default=DEMO_CONFIG["num_categories"],
        help=f"categories C, {CATEGORY_RANGE}",
    )
    p.add_argument(
        "--num-train-images",
        type=int,
        default=DEMO_CONFIG["num_train_images"],
        help="images in the train split",
    )
    p.add_argument(
        "--num-val-images",
        type=int,
        default=DEMO_CONFIG["num_val_images"],
        help="images in the val split",
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=list(DEMO_CONFIG["image_size"]),
        help="range of the random image width and height in pixels",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEMO_CONFIG["seed"],
        help="the vocabulary, tree and frequencies (and, with --image-seed, the images); -1: a "
        "random seed, printed and saved in meta.json",
    )
    p.add_argument(
        "--image-seed",
        type=int,
        default=DEMO_CONFIG["image_seed"],
        help="other renderings of the same vocabulary: new images, same categories and tree; "
        "-1: a random seed, printed and saved in meta.json",
    )
    p.add_argument(
        "--names",
        choices=NAME_STYLES,
        default=DEMO_CONFIG["names"],
        help="category names: descriptive ones spell the appearance ('red dotted star'), opaque "
        "ones are a unique made-up token per category (same images, boxes and tree)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that holds a dataset written by this generator",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes rendering the images (default: the CPU cores, at most 8); the output "
        "does not depend on it",
    )
    a = p.parse_args(argv)
    # every argument checked before any work, each error one line naming the argument
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    if not len(SHAPES) < a.num_categories <= MAX_CATEGORIES:
        p.error(f"--num-categories must be in {CATEGORY_RANGE}, got {a.num_categories}")
    for flag, num in (
        ("--num-train-images", a.num_train_images),
        ("--num-val-images", a.num_val_images),
    ):
        if num < 1:
            p.error(f"{flag} must be >= 1, got {num}")
    if not 16 <= a.image_size[0] <= a.image_size[1]:
        p.error(
            f"--image-size MIN MAX needs 16 <= MIN <= MAX, got {a.image_size[0]} {a.image_size[1]}"
        )
    for flag, value in (("--seed", a.seed), ("--image-seed", a.image_seed)):
        if value < -1:
            p.error(f"{flag} must be >= 0, or -1 for a random seed, got {value}")
    out = os.path.abspath(os.path.expanduser(a.out))
    try:
        if os.path.lexists(out):
            if not a.overwrite:
                raise InputError(
                    f"--out {out} exists; pass --overwrite to replace it (only a dataset written "
                    "by this generator is replaced) or choose another --out"
                )
            check_replaceable(out)
        check_output_dir(os.path.dirname(out), "--out (its parent folder)")
    except InputError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for flag in ("seed", "image_seed"):
        if getattr(a, flag) == -1:  # random, but repeatable: printed and kept in meta.json
            setattr(a, flag, random.SystemRandom().randrange(2**31))
            print(f"--{flag.replace('_', '-')} -1: using the random seed {getattr(a, flag)}")
    t0 = time.perf_counter()
    try:
        with _sigterm_as_exit():
            generate(
                out,
                num_categories=a.num_categories,
                num_train_images=a.num_train_images,
                num_val_images=a.num_val_images,
                image_size=tuple(a.image_size),
                seed=a.seed,
                image_seed=a.image_seed,
                overwrite=a.overwrite,
                workers=a.workers,
                names=a.names,
            )
    except WorkerError as e:
        p.exit(1, f"{p.prog}: error: {e}\n")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")

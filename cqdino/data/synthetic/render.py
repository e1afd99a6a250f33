"""Drawing the synthetic images: shapes with a texture and a border over a random background,
boxes of the visible extent; the long-tailed category quotas that decide each image's objects."""

import math
import os
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .categories import BORDERS, COLOURS, SHAPES, TEXTURES


def _shape_polygon(shape: str, size: int, rng: np.random.Generator) -> List[Tuple[float, float]]:
    r = size / 2.0
    cx = cy = r
    if shape == "triangle":
        n, start = 3, -math.pi / 2
    elif shape == "square":
        n, start = 4, math.pi / 4
    elif shape == "diamond":
        n, start = 4, 0.0
    elif shape == "pentagon":
        n, start = 5, -math.pi / 2
    elif shape == "hexagon":
        n, start = 6, 0.0
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    elif shape == "cross":
        a, b = r * 0.35, r
        rel = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a)]
        rel += [(-b, a), (-b, -a), (-a, -a)]
        return [(cx + x, cy + y) for x, y in rel]
    elif shape == "arrow":
        rel = [(-r, -0.3 * r), (0.1 * r, -0.3 * r), (0.1 * r, -r), (r, 0), (0.1 * r, r)]
        rel += [(0.1 * r, 0.3 * r), (-r, 0.3 * r)]
        return [(cx + x, cy + y) for x, y in rel]
    else:  # pragma: no cover
        raise ValueError(shape)
    return [
        (
            cx + r * math.cos(start + 2 * math.pi * i / n),
            cy + r * math.sin(start + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _shape_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool mask of a shape filling a w x h patch."""
    size = max(w, h) * 2  # draw large, then resize (cheap anti-aliasing, any aspect ratio)
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([0, 0, size - 1, size - 1], fill=255)
    elif shape == "ellipse":
        d.ellipse([0, size * 0.2, size - 1, size * 0.8], fill=255)
    elif shape == "ring":
        d.ellipse([0, 0, size - 1, size - 1], fill=255)
        d.ellipse([size * 0.3, size * 0.3, size * 0.7, size * 0.7], fill=0)
    elif shape == "crescent":
        d.ellipse([0, 0, size - 1, size - 1], fill=255)
        d.ellipse([size * 0.3, -size * 0.05, size * 1.2, size * 0.95], fill=0)
    else:
        d.polygon(_shape_polygon(shape, size - 1, rng), fill=255)
    img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img) >= 128


def _texture(texture: str, colour: np.ndarray, w: int, h: int, period: int) -> np.ndarray:
    """(h, w, 3) float32 colour patch with the texture."""
    yy, xx = np.mgrid[0:h, 0:w]
    dark = colour * 0.45
    if texture == "solid":
        sel = np.zeros((h, w), bool)
    elif texture == "h-striped":
        sel = (yy // period) % 2 == 1
    elif texture == "v-striped":
        sel = (xx // period) % 2 == 1
    elif texture == "diagonal":
        sel = ((xx + yy) // period) % 2 == 1
    elif texture == "checkered":
        sel = ((xx // period) + (yy // period)) % 2 == 1
    elif texture == "dotted":
        sel = ((xx % (2 * period) - period) ** 2 + (yy % (2 * period) - period) ** 2) < (
            0.5 * period
        ) ** 2
    elif texture == "grid":
        sel = (xx % (2 * period) == 0) | (yy % (2 * period) == 0)
    elif texture == "shaded":
        t = (xx / max(w - 1, 1))[..., None].astype(np.float32)
        return (colour * (1 - 0.6 * t)).astype(np.float32)
    else:  # pragma: no cover
        raise ValueError(texture)
    out = np.broadcast_to(colour, (h, w, 3)).astype(np.float32).copy()
    out[sel] = dark
    return out


def _border_mask(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its outside."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner


def _render_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    cats: List[dict],
    leaf_ids: np.ndarray,
    min_object_size: float,
    coarse_label_prob: float,
    min_visible: float,
) -> Tuple[np.ndarray, List[dict]]:
    """One image with the objects ``cats[leaf_ids]`` and its annotations (bbox xywh of the
    visible extent, category id)."""
    colours = np.asarray(list(COLOURS.values()), np.float32)
    # Background: a smooth random gradient plus mild noise.
    c0, c1 = rng.uniform(60, 200, size=(2, 3)).astype(np.float32)
    t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    img = np.broadcast_to(c0 * (1 - t) + c1 * t, (height, width, 3)).copy()
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * 6

    owner = np.full((height, width), -1, np.int32)  # which object each pixel shows
    objects = []
    short = min(width, height)
    for k, ci in enumerate(leaf_ids):
        cat = cats[ci]
        s, c, tex, b = cat["combo"]
        # Log-uniform scale from min_object_size to ~70% of the short side; mild aspect jitter.
        lo = min(float(min_object_size), 0.7 * short)
        size = float(np.exp(rng.uniform(np.log(lo), np.log(0.7 * short))))
        aspect = float(np.exp(rng.uniform(-0.3, 0.3)))
        w = max(6, min(width, int(round(size * aspect))))
        h = max(6, min(height, int(round(size / aspect))))
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        mask = _shape_mask(SHAPES[s], w, h, rng)
        if not mask.any():
            continue
        period = max(2, int(round(min(w, h) / rng.uniform(5, 9))))
        patch = _texture(TEXTURES[tex], colours[c], w, h, period)
        _, bw, bcol = BORDERS[b]
        if bw:
            bm = _border_mask(mask, bw)
            if isinstance(bcol, str):
                bcol = 255 - colours[c]
            patch[bm] = bcol
        region = img[y0 : y0 + h, x0 : x0 + w]
        region[mask] = patch[mask]
        owner[y0 : y0 + h, x0 : x0 + w][mask] = k
        label = cat["id"]
        if coarse_label_prob > 0 and rng.random() < coarse_label_prob:
            label = s + 1  # annotated only at the shape level (a parent category)
        objects.append((k, int(mask.sum()), label, x0, y0, w, h))

    anns = []
    for k, full_area, label, x0, y0, w, h in objects:
        ys, xs = np.nonzero(owner[y0 : y0 + h, x0 : x0 + w] == k)
        if len(ys) < max(min_visible * full_area, 4):
            continue  # mostly occluded: not annotated (like a real annotator would skip it)
        x1, y1 = x0 + xs.min(), y0 + ys.min()
        x2, y2 = x0 + xs.max() + 1, y0 + ys.max() + 1
        anns.append(
            dict(
                bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                category_id=int(label),
                area=float((x2 - x1) * (y2 - y1)),
                iscrowd=0,
            )
        )
    return np.clip(img, 0, 255).astype(np.uint8), anns


def _zipf_probs(num: int, alpha: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    rank = rng.permutation(num) + 1
    p = 1.0 / rank.astype(np.float64) ** alpha
    return p / p.sum()


def category_quotas(total: int, probs: np.ndarray, floor: int) -> np.ndarray:
    """Objects per leaf category for ``total`` objects: ``floor`` each (lowered when
    ``total`` cannot give every category that many), the rest split in proportion to
    ``probs`` by largest remainders. Sums to ``total``."""
    num = len(probs)
    floor = max(0, min(int(floor), total // num))
    rest = total - floor * num
    exact = rest * probs
    counts = np.floor(exact).astype(np.int64)
    short = rest - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts + floor


def _split_objects(
    num_images: int,
    max_objects: int,
    probs: np.ndarray,
    floor: int,
    rng: np.random.Generator,
) -> List[np.ndarray]:
    """Leaf indices of each image's objects: 1..max_objects objects per image (uniform), the
    categories drawn without replacement from the split's quotas (:func:`category_quotas`), so
    every category gets at least ``floor`` objects when the split is large enough."""
    per_image = rng.integers(1, max_objects + 1, size=num_images)
    quotas = category_quotas(int(per_image.sum()), probs, floor)
    pool = rng.permutation(np.repeat(np.arange(len(probs)), quotas))
    return np.split(pool, np.cumsum(per_image)[:-1])


def _render_chunk(state: dict, split: str, split_idx: int, first: int, objects) -> List[tuple]:
    """Render and save images ``first, first + 1, ...`` of a split (one per entry of
    ``objects``); returns ``(image record, annotations without ids)`` per image."""
    lo, hi = state["image_size"]
    out = []
    for k, leaf_ids in enumerate(objects):
        i = first + k
        rng = np.random.default_rng([state["seed"], state["image_seed"], 100 + split_idx, i])
        w = int(rng.integers(lo, hi + 1))
        h = int(rng.integers(lo, hi + 1))
        pixels, anns = _render_image(
            rng,
            w,
            h,
            state["leaves"],
            leaf_ids,
            state["min_object_size"],
            state["coarse_label_prob"],
            state["min_visible"],
        )
        file_name = f"{split}/{i + 1:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(state["root"], file_name), quality=92)
        out.append((dict(id=i + 1, file_name=file_name, width=w, height=h), anns))
    return out

"""Scores from the ``shapes`` world's ground truth: colour identity, shape, harmonization.

A pixel is classified as the nearest of the world's known surface colours (every object
colour and every backdrop colour under every light), so an object keeps its identity
when its light changes and a region that turned into backdrop counts as such.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_erosion

from .world import BACKDROPS, COLOURS, LIGHTS, apply_light

BACKDROP = "backdrop"


def _palette() -> tuple[np.ndarray, list[str]]:
    colours, names = [], []
    for light in LIGHTS:
        for name, rgb in COLOURS.items():
            colours.append(apply_light(rgb, light))
            names.append(name)
        for ground, sky in BACKDROPS.values():
            colours += [apply_light(ground, light), apply_light(sky, light)]
            names += [BACKDROP, BACKDROP]
    return np.stack(colours).astype(np.float32), names


_PALETTE, _NAMES = _palette()
CLASSES = [*COLOURS, BACKDROP]


def classify(image: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> (...) index into :data:`CLASSES` of the nearest colour."""
    d = ((image[..., None, :] - _PALETTE) ** 2).sum(-1)
    nearest = d.argmin(-1)
    lookup = np.array([CLASSES.index(n) for n in _NAMES])
    return lookup[nearest]


def core(mask: np.ndarray, threshold: float = 0.5, erode: int = 2) -> np.ndarray:
    """The inside of a soft mask, a few pixels from its edge (edges blur in any model)."""
    inside = mask > threshold
    for iterations in range(erode, 0, -1):  # thin slivers: erode less
        eroded = binary_erosion(inside, iterations=iterations)
        if eroded.any():
            return eroded
    return inside


def region_colour(image: np.ndarray, region: np.ndarray, min_share: float = 0.2) -> str:
    """The object colour a region shows: its most frequent object class among its pixels,
    if object pixels are at least ``min_share`` of it; else :data:`BACKDROP`."""
    labels = classify(image[region])
    counts = np.bincount(labels, minlength=len(CLASSES))[: len(COLOURS)]
    if counts.sum() < min_share * max(1, len(labels)):
        return BACKDROP
    return CLASSES[int(counts.argmax())]


def colour_iou(image: np.ndarray, colour: str, mask: np.ndarray, exclude: np.ndarray) -> float:
    """IoU of the pixels classified as ``colour`` (outside ``exclude``) with ``mask`` > 0.5."""
    keep = ~exclude
    drawn = (classify(image) == CLASSES.index(colour)) & keep
    target = (mask > 0.5) & keep
    union = (drawn | target).sum()
    return float((drawn & target).sum() / union) if union else 1.0


def harmonization(output: np.ndarray, pasted: np.ndarray, truth: np.ndarray) -> float:
    """How far a region's mean colour moved from what was pasted toward the truth.

    1: it shows the scene light's true colour; 0: unchanged; below 0: further away.
    Arguments are the region's pixels (n, 3): output, pasted input, ground truth.
    """
    o, p, t = (np.asarray(x, np.float64).mean(0) for x in (output, pasted, truth))
    gap = np.linalg.norm(p - t)
    if gap < 1e-6:
        return 1.0 if np.linalg.norm(o - t) < 1e-6 else 0.0
    return float(1.0 - np.linalg.norm(o - t) / gap)

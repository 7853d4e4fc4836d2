"""Shared pieces for the engine tests: tiny engines (built once), simple collages.

Torch runs single-threaded here: on a 2-core machine shared with other test runs,
two OpenMP threads spin against each other and make tiny models ~10x slower.

``PSD_COLLAGE_TEST_DEVICE`` / ``PSD_COLLAGE_TEST_DTYPE`` (e.g. ``cuda`` / ``fp16``) move the
tiny engines onto another device: ``benchmarks/gpu_check.sh`` runs the engine tests so.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
import torch

from psd_collage.engine import Engine, GenerationRequest, SteeredPhrase, load_engine

torch.set_num_threads(1)

DEVICE = os.environ.get("PSD_COLLAGE_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("PSD_COLLAGE_TEST_DTYPE") or None
#: How close two pictures computed in different batch shapes are: float rounding only.
IMAGE_ATOL = 1e-4 if DTYPE in (None, "fp32", "float32") else 5e-3


@cache
def tiny_engine(model: str = "tiny", scheduler: str = "euler_ancestral") -> Engine:
    """A tiny engine on the test device, CPU by default (cached: building is the slow part)."""
    return load_engine(model, device=DEVICE, dtype=DTYPE, scheduler=scheduler)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random picture (noise alone is not what a VAE sees in practice)."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 16 + 1, width // 16 + 1, 3), dtype=np.float32)
    image = np.kron(small, np.ones((16, 16, 1), np.float32))[:height, :width]
    return np.clip(image + 0.1 * rng.standard_normal(image.shape).astype(np.float32), 0, 1)


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), np.float32)
    mask[top:bottom, left:right] = 1.0
    return mask


def two_phrase_request(
    height: int, width: int, inside: float, outside: float, **kwargs: object
) -> GenerationRequest:
    """A street scene with a car on the left third and a tree in the bottom-right quarter."""
    phrases = [
        SteeredPhrase(
            "red car", box_mask(height, width, 0, 0, height, width // 3), inside, outside
        ),
        SteeredPhrase(
            "old tree",
            box_mask(height, width, height // 2, width // 2, height, width),
            inside,
            outside,
        ),
    ]
    options = {"seeds": [0], "steps": 6, **kwargs}
    return GenerationRequest(
        image=random_image(height, width),
        strength=np.ones((height, width), np.float32),
        prompt="a street with a red car and an old tree",
        phrases=phrases,
        **options,  # type: ignore[arg-type]
    )

"""Colour conversion between a document's own mode and the sRGB the model sees.

The one place that knows ICC: PIL.ImageCms with the document's embedded profile
(resource 1039). Without one, Grayscale is treated as gamma-2.2 gray (close to
sRGB) and CMYK falls back to the naive formula, with a warning from the caller.
Arrays are float32 in [0, 1], channels last; CMYK follows PIL's convention
(0 = no ink), which is the inverse of how PSD stores it.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms

SUPPORTED_MODES = ("RGB", "GRAYSCALE", "CMYK")
_PIL_MODE = {"RGB": "RGB", "GRAYSCALE": "L", "CMYK": "CMYK"}


def to_srgb(pixels: np.ndarray, mode: str, icc: bytes | None = None) -> np.ndarray:
    """Native channels (H, W, C) -> sRGB (H, W, 3)."""
    if mode == "GRAYSCALE":
        gray = pixels[..., :1] if pixels.ndim == 3 else pixels[..., None]
        return np.repeat(gray, 3, axis=2).astype(np.float32)
    if mode == "RGB":
        return pixels[..., :3].astype(np.float32, copy=False)
    if mode != "CMYK":
        raise ValueError(f"unsupported mode {mode}")
    transform = _transform(icc, "CMYK", "RGB") if icc else None
    if transform is None:
        cmy, k = pixels[..., :3], pixels[..., 3:4]
        return ((1.0 - cmy) * (1.0 - k)).astype(np.float32)
    image = Image.fromarray(_to_u8(pixels[..., :4]), "CMYK")
    return np.asarray(ImageCms.applyTransform(image, transform), np.float32) / 255.0


def from_srgb(rgb: np.ndarray, mode: str, icc: bytes | None = None) -> np.ndarray:
    """sRGB (H, W, 3) -> native channels (H, W, C)."""
    if mode == "RGB":
        return rgb.astype(np.float32, copy=False)
    if mode == "GRAYSCALE":
        # Rec. 601 luma, as Photoshop's Image > Mode > Grayscale does for sRGB input.
        weights = np.array([0.299, 0.587, 0.114], np.float32)
        return (rgb @ weights)[..., None].astype(np.float32)
    if mode != "CMYK":
        raise ValueError(f"unsupported mode {mode}")
    transform = _transform(icc, "RGB", "CMYK") if icc else None
    if transform is None:
        k = 1.0 - rgb.max(axis=2, keepdims=True)
        cmy = (1.0 - rgb - k) / np.maximum(1.0 - k, 1e-6)
        return np.concatenate([cmy, k], axis=2).astype(np.float32)
    image = Image.fromarray(_to_u8(rgb), "RGB")
    return np.asarray(ImageCms.applyTransform(image, transform), np.float32) / 255.0


def _to_u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _transform(icc: bytes, source_mode: str, target_mode: str) -> ImageCms.ImageCmsTransform | None:
    try:
        document = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError):
        return None
    srgb = ImageCms.createProfile("sRGB")
    if source_mode == "RGB":
        return ImageCms.buildTransform(srgb, document, "RGB", target_mode)
    return ImageCms.buildTransform(document, srgb, source_mode, target_mode)

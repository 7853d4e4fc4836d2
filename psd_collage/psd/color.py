"""Colour conversion between a document's own mode and the sRGB the model sees.

The one place that knows ICC: PIL.ImageCms with the document's embedded profile
(resource 1039) for RGB (unless it is sRGB already), Grayscale and CMYK.
Without a profile, RGB is taken as sRGB, Grayscale as gray with the sRGB curve
and CMYK falls back to the naive formula (the reader warns). Arrays are float32
in [0, 1], channels last; CMYK follows PIL's convention (0 = no ink), the inverse
of how PSD stores it. ImageCms converts 8-bit images: the model's input and
output have no more precision than that, and pinned pixels are pasted back from
the document's own data, never through this module.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms

from ..collage import to_u8

SUPPORTED_MODES = ("RGB", "GRAYSCALE", "CMYK")
_PIL_MODE = {"RGB": "RGB", "GRAYSCALE": "L", "CMYK": "CMYK"}
_CHANNELS = {"RGB": 3, "GRAYSCALE": 1, "CMYK": 4}


def to_srgb(pixels: np.ndarray, mode: str, icc: bytes | None = None) -> np.ndarray:
    """Native channels (H, W, C) -> sRGB (H, W, 3)."""
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"unsupported mode {mode}")
    native = pixels if pixels.ndim == 3 else pixels[..., None]
    native = native[..., : _CHANNELS[mode]]
    transform = _transform(icc, mode, to_srgb=True) if icc else None
    if transform is not None:
        image = Image.fromarray(to_u8(_squeeze(native)), _PIL_MODE[mode])
        return np.asarray(ImageCms.applyTransform(image, transform), np.float32) / 255.0
    if mode == "RGB":
        return native.astype(np.float32, copy=False)
    if mode == "GRAYSCALE":
        return np.repeat(native, 3, axis=2).astype(np.float32)
    cmy, k = native[..., :3], native[..., 3:4]
    return ((1.0 - cmy) * (1.0 - k)).astype(np.float32)


def native_to_srgb8(native: np.ndarray, mode: str, icc: bytes | None = None) -> np.ndarray:
    """psd-tools' float channels -> uint8 sRGB (H, W, 3).

    psd-tools keeps the file's CMYK convention (1 = no ink); :func:`to_srgb` takes
    PIL's (0 = no ink). 32-bit documents hold HDR values: they are clipped to [0, 1].
    """
    if mode == "CMYK":
        native = 1.0 - native
    return to_u8(to_srgb(native, mode, icc))


def from_srgb(rgb: np.ndarray, mode: str, icc: bytes | None = None) -> np.ndarray:
    """sRGB (H, W, 3) -> native channels (H, W, C)."""
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"unsupported mode {mode}")
    transform = _transform(icc, mode, to_srgb=False) if icc else None
    if transform is not None:
        image = ImageCms.applyTransform(Image.fromarray(to_u8(rgb), "RGB"), transform)
        native = np.asarray(image, np.float32) / 255.0
        return native if native.ndim == 3 else native[..., None]
    if mode == "RGB":
        return rgb.astype(np.float32, copy=False)
    if mode == "GRAYSCALE":
        # Rec. 601 luma, as Photoshop's Image > Mode > Grayscale does without a profile.
        weights = np.array([0.299, 0.587, 0.114], np.float32)
        return (rgb @ weights)[..., None].astype(np.float32)
    k = 1.0 - rgb.max(axis=2, keepdims=True)
    cmy = (1.0 - rgb - k) / np.maximum(1.0 - k, 1e-6)
    return np.concatenate([cmy, k], axis=2).astype(np.float32)


def profile_name(icc: bytes | None) -> str:
    """The profile's description, e.g. 'Adobe RGB (1998)'; '' when there is none or it is unreadable."""
    profile = _profile(icc) if icc else None
    if profile is None:
        return ""
    try:
        return ImageCms.getProfileDescription(profile).strip()
    except ImageCms.PyCMSError:
        return ""


def _squeeze(native: np.ndarray) -> np.ndarray:
    return native[..., 0] if native.shape[2] == 1 else native


@lru_cache(maxsize=8)
def _profile(icc: bytes) -> ImageCms.ImageCmsProfile | None:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError):
        return None


@lru_cache(maxsize=16)
def _transform(icc: bytes, mode: str, *, to_srgb: bool) -> ImageCms.ImageCmsTransform | None:
    """None when there is nothing to convert (an sRGB document) or the profile is unreadable."""
    document = _profile(icc)
    if document is None:
        return None
    name = profile_name(icc).lower().replace(" ", "")
    if mode == "RGB" and "srgb" in name and "linear" not in name:
        return None  # already what the model sees (a linear-light "sRGB" profile is not)
    srgb = ImageCms.createProfile("sRGB")
    try:
        if to_srgb:
            return ImageCms.buildTransform(document, srgb, _PIL_MODE[mode], "RGB")
        return ImageCms.buildTransform(srgb, document, "RGB", _PIL_MODE[mode])
    except ImageCms.PyCMSError:
        return None

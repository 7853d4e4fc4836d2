"""On-disk cache of learned textual-inversion tokens.

Dropping the same PSD again must cost nothing (docs/design.md 2.3), so each learned
token is stored under a key that covers everything the training result depends
on: the model (name, kind and a cheap fingerprint of its weights), the training
image, the mask, the caption, the training settings and this file's format.
An entry is one safetensors file (the embedding rows, one per text encoder, plus
string metadata) written atomically, so two processes writing the same entry at
once leave one complete file. An entry that cannot be read is simply learned
again: the cache is a speed-up, never a reason for a render to fail.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from ..atomic import atomic_write_bytes
from ..errors import CollageError

log = logging.getLogger(__name__)

#: Bump when the training recipe or the entry layout changes: old entries stop matching.
FORMAT_VERSION = 1


def cache_dir() -> Path:
    """``$PSD_COLLAGE_CACHE``, else ``$XDG_CACHE_HOME/psd-collage``, else ``~/.cache/psd-collage``."""
    explicit = os.environ.get("PSD_COLLAGE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "psd-collage"


def ti_dir(root: Path | None = None) -> Path:
    """Where textual-inversion entries live: ``<cache>/ti``."""
    return (root if root is not None else cache_dir()) / "ti"


def model_fingerprint(components) -> str:
    """A cheap hash that changes when the weights do: a few text-embedding rows and UNet edges.

    Only rows of the base vocabulary are hashed (the first ones and the end-of-text row),
    never the last rows, because learned tokens are appended there and must not change
    the key of the model they were learned on.
    """
    h = hashlib.sha256()
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        weight = encoder.get_input_embeddings().weight
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        rows = sorted({0, 1, min(eos, tokenizer.vocab_size - 1)})
        _hash_tensor(h, weight[rows])
        h.update(repr((tuple(weight.shape[1:]), type(encoder).__name__)).encode())
    unet = components.unet
    _hash_tensor(h, unet.conv_in.weight)
    _hash_tensor(h, unet.conv_out.weight)
    return h.hexdigest()


def entry_key(
    *,
    model_name: str,
    kind: str,
    fingerprint: str,
    image: np.ndarray,
    mask: np.ndarray,
    caption: str,
    settings: Sequence[object],
    recipe: Sequence[str],
) -> str:
    """The sha256 that names one cache entry (hex)."""
    h = hashlib.sha256()
    h.update(f"psd-collage ti v{FORMAT_VERSION}\0".encode())
    for part in (str(model_name), kind, fingerprint, caption, repr(tuple(settings)), *recipe):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    for array in (image, mask):
        array = np.ascontiguousarray(array, dtype=np.float32)
        h.update(repr(array.shape).encode())
        h.update(array.tobytes())
    return h.hexdigest()


@dataclass
class CacheEntry:
    """One learned token: its embedding row for each text encoder, and what it was learned from."""

    rows: list[torch.Tensor]  # float32, (dim_i,) per text encoder
    metadata: dict[str, str]


def entry_path(key: str, root: Path | None = None) -> Path:
    return ti_dir(root) / f"{key}.safetensors"


def load_entry(key: str, dims: Sequence[int], root: Path | None = None) -> CacheEntry | None:
    """The stored entry, or None when it is missing, unreadable, from another format or shape."""
    path = entry_path(key, root)
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            if metadata.get("format") != str(FORMAT_VERSION) or metadata.get("key") != key:
                raise ValueError("written by another version")
            rows = [fh.get_tensor(f"row_{i}").to(torch.float32) for i in range(len(dims))]
        if [tuple(r.shape) for r in rows] != [(d,) for d in dims]:
            raise ValueError("embedding size does not match the model")
        if not all(torch.isfinite(r).all() for r in rows):
            raise ValueError("non-finite values")
    except Exception as exc:  # a damaged entry of any kind: learn it again and overwrite
        log.warning("textual-inversion cache entry %s is damaged (%s); learning again", path, exc)
        return None
    return CacheEntry(rows=rows, metadata=metadata)


def save_entry(
    key: str, rows: Sequence[torch.Tensor], metadata: dict[str, str], root: Path | None = None
) -> Path | None:
    """Store an entry atomically; a cache that cannot be written only costs a warning."""
    path = entry_path(key, root)
    tensors = {
        f"row_{i}": r.detach().to("cpu", torch.float32).contiguous() for i, r in enumerate(rows)
    }
    meta = {**{k: str(v) for k, v in metadata.items()}, "format": str(FORMAT_VERSION), "key": key}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))
    except (OSError, CollageError) as exc:
        log.warning("could not write textual-inversion cache entry %s: %s", path, exc)
        return None


def _hash_tensor(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(repr((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

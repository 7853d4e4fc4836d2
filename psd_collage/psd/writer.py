"""Writing harmonized variants back into the PSD/PSB as a new group of pixel layers.

Works on psd-tools' low-level records rather than its layer API, for three reasons:
the original layers must come out byte for byte as they went in (no re-encoding, no
recompositing), the new layers must be stored in the document's own mode and depth
with channel ids other readers accept, and a 8000 x 6000 document must not be
recomposited just to refresh the flattened image we already hold (the visible variant
is an opaque full-canvas layer on top, so it *is* the document's composite).

Each psd-tools pitfall from docs/design.md section 3 is worked around in exactly one place
below, with a comment saying why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from psd_tools.constants import (
    BlendMode,
    ChannelID,
    ColorMode,
    Compression,
    Resource,
    SectionDivider,
    Tag,
)
from psd_tools.psd import PSD
from psd_tools.psd.header import FileHeader
from psd_tools.psd.image_resources import ImageResource
from psd_tools.psd.layer_and_mask import (
    ChannelData,
    ChannelDataList,
    ChannelInfo,
    LayerFlags,
    LayerInfo,
    LayerRecord,
)
from psd_tools.psd.tagged_blocks import TaggedBlocks

from ..atomic import atomic_open, atomic_write
from ..errors import CollageError, UnsupportedDocument
from .boundary import channel_block_length, layer_records
from .color import from_srgb
from .history import add_render
from .names import HARMONIZED_PREFIX
from .rle import EncodedPlane, encode_plane
from .rle import image_data as rle_image_data

__all__ = ["backup_path", "layer_compression", "write_variants"]

# Colour channels each supported mode stores per layer, and the name color.py uses.
_MODES: dict[ColorMode, tuple[str, int]] = {
    ColorMode.RGB: ("RGB", 3),
    ColorMode.GRAYSCALE: ("GRAYSCALE", 1),
    ColorMode.CMYK: ("CMYK", 4),
}
_CONVERT_HINT = "convert it in Photoshop with Image > Mode > RGB Color (8 or 16 Bits/Channel)"

# Raw sample types of a channel plane at each depth (PSD is big-endian).
_DTYPES: dict[int, np.dtype] = {
    8: np.dtype("u1"),
    16: np.dtype(">u2"),
    32: np.dtype(">f4"),
}
_FULL_SCALE: dict[int, float] = {8: 255.0, 16: 65535.0, 32: 1.0}
_CHANNELS = {name: count for name, count in _MODES.values()}

#: Pinned pixels of fractional weight are blended one by one while they are at most
#: 1/this of a strip (feathered edges); more than that, dense passes are faster.
_SPARSE_BLEND_DIVISOR = 8

# Rows are converted a strip at a time so that an 8000 x 6000 variant costs one
# strip of float32 scratch, not several full-canvas float arrays; a strip's buffer
# (3 MB in RGB) stays in a core's L2 cache over the passes (measured: 1 << 22 pixels
# took twice as long in benchmarks/bench_psd_io.py).
_STRIP_PIXELS = 1 << 18

_GROUP_END_NAME = "</Layer group>"
_MAX_NAME = 255  # Photoshop's limit for layer names


def layer_compression(depth: int) -> Compression:
    """Codec for the new layers' colour channels (measured in benchmarks/bench_psd_io.py).

    8 bits: RLE, what Photoshop writes there; ~0.1 s per 12-Mpixel plane with
    psd-tools' C codec against ~0.7-1 s for ZIP, and it shrinks the flat areas that
    pinning leaves. 16 and 32 bits: RAW. RLE of 16-bit or float samples gains ~0 %
    on photographic content, and ag-psd misreads RLE beyond 8 bits; Photoshop's own
    choice, ZIP with prediction, costs ~1 s a plane and ImageMagick cannot read it at
    32 bits. Every reader decodes RAW.
    """
    return Compression.RLE if depth == 8 else Compression.RAW


def _transparency_compression(depth: int) -> Compression:
    """The constant opaque plane: RLE at 8 bits, ZIP at 16 (0.2 s, ~0.1 % of raw).

    32 bits stays RAW: ag-psd misreads ZIP there, and RLE of a float plane is no
    smaller than raw.
    """
    return {8: Compression.RLE, 16: Compression.ZIP}.get(depth, Compression.RAW)


def write_variants(
    source: str | Path,
    destination: str | Path,
    variants: Sequence[np.ndarray],
    names: Sequence[str],
    group_name: str,
    pin: np.ndarray | None = None,
    pin_base: int | None = None,
    in_place_backup: bool = True,
    *,
    record: Mapping[str, Any] | None = None,
    pin_document: np.ndarray | None = None,
    insert_at: int | None = None,
    overlay: np.ndarray | None = None,
    compression: Compression | None = None,
) -> Path:
    """Write ``source`` plus a new top group of variant layers to ``destination``.

    ``variants`` are (H, W, 3) sRGB at document size, float in [0, 1] or uint8 (a
    quarter of the memory for an upscaled variant); the first is visible, the others hidden, and the first also becomes the flattened image.
    ``pin`` (H, W) weighs the source's own native pixels back in before quantising, so
    where it is 1 the output equals the source bit for bit. The source is the
    document's composite, or with ``pin_base`` (a record index, as the reader's
    :class:`~psd_collage.collage.BaseImage` gives it) that earlier variant, except
    where ``pin_document`` (H, W) is True: there it is the document's own layers
    composited without any ``[harmonized]`` group (where a ``[redo]`` layer moved away,
    a locked layer under it comes back exactly).
    ``destination == source`` means in place: ``NAME.psd.bak`` is kept first (unless
    ``in_place_backup`` is False, or a ``.bak`` exists already: it keeps the very first
    original) and the file is replaced atomically, keeping its mode and owner. ``record``
    (this render's settings) is added to the document's XMP, keyed by ``group_name``
    (see :mod:`psd_collage.psd.history`). ``insert_at``: how many top-level layers stay
    below the new group (None: it goes on top); ``overlay`` (H, W, 4) uint8 sRGB is what
    the layers above it show, laid over the first variant in the flattened image.
    ``compression`` overrides :func:`layer_compression` (for measurements).
    """
    source = Path(source)
    destination = Path(destination)
    in_place = _same_file(source, destination)
    if not destination.parent.is_dir():
        raise CollageError(
            "the output folder does not exist; create it or choose another output",
            path=destination,
        )

    document = _read(source)
    header = document.header
    mode, n_color = _mode_of(document, source)
    depth = header.depth
    _check_arguments(variants, names, group_name, pin, header)
    icc = document.image_resources.get_data(Resource.ICC_PROFILE)

    if pin is not None and not pin.any():
        pin = None  # nothing pinned: no need to decode the source
    pinned = None
    if pin is not None:
        pinned = _pinned_pixels(document, source, n_color, pin_base, pin_document)
    layers = _layer_info(document)
    merged_alpha = layers.layer_count < 0
    next_id = _give_layer_ids(layers)
    codec = compression if compression is not None else layer_compression(depth)

    records, merged, merged_rle = _variant_layers(
        variants, names, next_id + 1, (mode, icc, header, codec), pin, pinned, overlay is not None
    )
    del pinned
    group = (group_name, next_id, n_color)
    _insert_group(layers, records, group, _record_position(layers, insert_at), merged_alpha)

    if overlay is not None:
        assert merged is not None
        merged = _laid_over(merged, overlay, mode, icc, depth)
        merged_rle = None  # not the first variant's rows any more
    _set_merged_image(document, merged, merged_alpha, merged_rle, n_color)
    del merged, merged_rle
    if record is not None:
        resources = document.image_resources
        xmp = add_render(resources.get_data(Resource.XMP_METADATA), {**record, "group": group_name})
        resources[Resource.XMP_METADATA] = ImageResource(key=Resource.XMP_METADATA, data=xmp)

    if in_place and in_place_backup:
        _backup(source)
    return atomic_write(destination, document.write)


def _pinned_pixels(
    document: PSD,
    source: Path,
    n_color: int,
    pin_base: int | None,
    pin_document: np.ndarray | None,
) -> np.ndarray:
    """The native pixels a pin weighs back in: the document's composite or the earlier
    variant ``pin_base``, with the layers-only composite where ``pin_document`` is True."""
    pinned = _pin_source(document, source, n_color, pin_base)
    if pin_base is not None and pin_document is not None and pin_document.any():
        pinned = np.array(pinned)  # writable
        layers_only = _layers_composite(document, n_color)
        np.copyto(pinned, layers_only, where=pin_document[None])
    return pinned


def _insert_group(
    layers: LayerInfo,
    variants: list[tuple[LayerRecord, ChannelDataList]],
    group: tuple[str, int, int],
    at: int,
    merged_alpha: bool,
) -> None:
    """Put the variant layers, inside a new group, at record index ``at``.

    ``group`` is (name, first free layer id, colour channels). Record order is bottom
    to top: the group's end marker, the variants (the first, visible one last, so that
    it is at the top of the group in the Layers panel), then the group's own record.
    """
    name, next_id, n_color = group
    records = [_group_record(_GROUP_END_NAME, next_id, n_color, end=True)]
    records += reversed(variants)
    records.append(_group_record(name, next_id + 1 + len(variants), n_color, end=False))
    layers.layer_records[at:at] = [layer_record for layer_record, _ in records]
    layers.channel_image_data[at:at] = [channels for _, channels in records]
    layers.layer_count = (-1 if merged_alpha else 1) * len(layers.layer_records)


# --- reading ---------------------------------------------------------------------


def _same_file(source: Path, destination: Path) -> bool:
    try:
        return destination.exists() and os.path.samefile(source, destination)
    except OSError:
        return False


def _read(path: Path) -> PSD:
    """Parse the file once, whole; the source file is never opened for writing."""
    try:
        with open(path, "rb") as fh:
            return PSD.read(fh)
    except FileNotFoundError as exc:
        raise CollageError("file not found", path=path) from exc
    except OSError as exc:
        raise CollageError(f"cannot read the file ({exc.strerror})", path=path) from exc
    except MemoryError:
        raise
    except Exception as exc:  # psd-tools raises ValueError, struct.error, EOFError...
        raise CollageError(
            f"not a readable Photoshop PSD/PSB file ({type(exc).__name__}: {exc}); "
            "re-save it from Photoshop",
            path=path,
        ) from exc


def _mode_of(document: PSD, path: Path) -> tuple[str, int]:
    header = document.header
    if header.color_mode not in _MODES or header.depth not in _DTYPES:
        raise UnsupportedDocument(
            f"{header.color_mode.name.title()} {header.depth}-bit documents are not "
            f"supported; {_CONVERT_HINT}",
            path=path,
        )
    return _MODES[header.color_mode]


def _check_arguments(
    variants: Sequence[np.ndarray],
    names: Sequence[str],
    group_name: str,
    pin: np.ndarray | None,
    header: FileHeader,
) -> None:
    """Caller mistakes (not user input) raise plain ValueError.

    Variants are checked one by one as they are converted (:func:`_check_variant`):
    the caller may produce them lazily, upscaled on access.
    """
    if not len(variants):
        raise ValueError("write_variants needs at least one variant")
    if len(names) != len(variants):
        raise ValueError(f"{len(variants)} variants but {len(names)} names")
    for name in [*names, group_name]:
        if not name or len(name) > _MAX_NAME:
            raise ValueError(f"layer names must have 1 to {_MAX_NAME} characters: {name!r}")
    if pin is not None and pin.shape != (header.height, header.width):
        raise ValueError(f"pin has shape {pin.shape}, expected {(header.height, header.width)}")


def _check_variant(index: int, variant: np.ndarray, header: FileHeader) -> None:
    size = (header.height, header.width, 3)
    if variant.shape != size:
        raise ValueError(f"variant {index} has shape {variant.shape}, expected {size}")
    if variant.dtype.kind != "f" and variant.dtype != np.uint8:
        raise ValueError(f"variant {index} must be float in [0, 1] or uint8, not {variant.dtype}")


def _layer_info(document: PSD) -> LayerInfo:
    """The layer list the readers consult, created when the document has none.

    Photoshop keeps 16/32-bit layers in an Lr16/Lr32 block and leaves the plain
    section empty; :func:`layer_records` picks whichever is used.
    """
    info = layer_records(document)
    if info is None:
        info = LayerInfo()
        document.layer_and_mask_information.layer_info = info
    return info


def _give_layer_ids(layers: LayerInfo) -> int:
    """Give every record without a Photoshop layer id one, as Photoshop does on save;
    returns the next free id.

    Files written by psd-tools, ag-psd and other scripts carry none, and the render
    record identifies layers by id (a moved ``[redo]`` layer is found by it). Only a
    'lyid' block is added to such records; their pixels stay byte for byte.
    """
    ids = [_record_id(record) for record in layers.layer_records]
    next_id = max(ids, default=0) + 1
    for record, layer_id in zip(layers.layer_records, ids, strict=True):
        if layer_id <= 0:
            record.tagged_blocks.set_data(Tag.LAYER_ID, next_id)
            next_id += 1
    return next_id


def _record_id(record: LayerRecord) -> int:
    value = record.tagged_blocks.get_data(Tag.LAYER_ID, 0)
    return int(value) if isinstance(value, int) else 0


def _merged_planes(document: PSD) -> np.ndarray:
    """The stored flattened image, (channels, H, W) raw samples at the document's depth."""
    header = document.header
    data = document.image_data.get_data(header, split=False)
    return np.frombuffer(data, _DTYPES[header.depth]).reshape(
        header.channels, header.height, header.width
    )


def _has_real_composite(document: PSD) -> bool:
    """False for files saved without "Maximize compatibility": their merged image is blank."""
    version = document.image_resources.get_data(Resource.VERSION_INFO)
    return bool(version.has_composite) if version is not None else True


def _document_source(document: PSD, n_color: int) -> np.ndarray:
    """The document's composite in native mode and depth, (n_color, H, W)."""
    if _has_real_composite(document):
        return _merged_planes(document)[:n_color]
    # No real merged image: let psd-tools composite the layers (on white, as
    # Photoshop flattens) and quantise it, so "the source" is defined at our depth.
    from psd_tools import PSDImage
    from psd_tools.composite import composite

    color, _, _ = composite(PSDImage(document), color=1.0, alpha=1.0)
    depth = document.header.depth
    return _quantise(color.transpose(2, 0, 1)[:n_color] * _FULL_SCALE[depth], depth)


def _record_position(layers: LayerInfo, insert_at: int | None) -> int:
    """The record index for a new top-level block with ``insert_at`` top-level layers below."""
    records = list(layers.layer_records)
    if insert_at is None:
        return len(records)
    top_level = _top_level_positions(records)  # top first
    if not 0 < insert_at <= len(top_level):
        return len(records) if insert_at else 0
    return top_level[len(top_level) - insert_at] + 1  # right above that top-level layer


def _top_level_positions(records: list[LayerRecord]) -> list[int]:
    """Record indices of the top-level layers, top first.

    Records are stored bottom to top and a group's record comes after its children,
    closed below them by an end marker.
    """
    positions, nesting = [], 0
    for position in range(len(records) - 1, -1, -1):
        kind = _divider_kind(records[position])
        if kind == SectionDivider.BOUNDING_SECTION_DIVIDER:
            nesting -= 1
            continue
        if nesting == 0:
            positions.append(position)
        if kind in (SectionDivider.OPEN_FOLDER, SectionDivider.CLOSED_FOLDER):
            nesting += 1
    return positions


def _laid_over(
    merged: np.ndarray, overlay: np.ndarray, mode: str, icc: bytes | None, depth: int
) -> np.ndarray:
    """``overlay`` (RGBA sRGB uint8) laid over raw planes, normal blend in document space.

    Only the box the overlay covers is converted: type is a small part of a poster.
    """
    rows = np.flatnonzero(overlay[..., 3].any(axis=1))
    cols = np.flatnonzero(overlay[..., 3].any(axis=0))
    if not len(rows):
        return merged
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    part = overlay[box[1:]]
    alpha = part[..., 3].astype(np.float32) / 255.0
    rgb = part[..., :3].astype(np.float32) / 255.0
    over = _native_planes(rgb, mode, icc, depth, _strips(None, *rgb.shape[:2]), None)
    mixed = merged[box].astype(np.float32) * (1.0 - alpha) + over.astype(np.float32) * alpha
    out = np.array(merged)
    out[box] = _quantise(mixed, depth)
    return out


def _layers_composite(document: PSD, n_color: int) -> np.ndarray:
    """The visible layers without ``[harmonized]`` groups, native mode and depth, on white."""
    from psd_tools import PSDImage
    from psd_tools.composite import composite

    image = PSDImage(document)
    outputs = {
        id(layer)
        for layer in image
        if layer.is_group() and layer.name.strip().startswith(HARMONIZED_PREFIX)
    }
    color, _, _ = composite(
        image,
        color=1.0,
        alpha=1.0,
        layer_filter=lambda layer: layer.is_visible() and id(layer) not in outputs,
    )
    depth = document.header.depth
    return _quantise(color.transpose(2, 0, 1)[:n_color] * _FULL_SCALE[depth], depth)


def _pin_source(document: PSD, path: Path, n_color: int, pin_base: int | None) -> np.ndarray:
    """Native pixels that pinned regions keep: the composite or an earlier variant."""
    if pin_base is None:
        return _document_source(document, n_color)
    record, channels = _find_variant(document, path, pin_base)
    header = document.header
    width, height = record.right - record.left, record.bottom - record.top
    planes: dict[int, np.ndarray] = {}
    for info, data in zip(record.channel_info, channels, strict=False):
        if -1 <= info.id < n_color and width > 0 and height > 0:
            raw = data.get_data(width, height, header.depth, header.version)
            planes[int(info.id)] = np.frombuffer(raw, _DTYPES[header.depth]).reshape(height, width)
    if any(index not in planes for index in range(n_color)):
        raise CollageError(
            f"the earlier variant {_name(record)!r} has no pixels to keep; "
            "pick another variant or run without editing",
            path=path,
        )
    layer = np.stack([planes[index] for index in range(n_color)])
    full = (record.left, record.top, record.right, record.bottom) == (
        0,
        0,
        header.width,
        header.height,
    )
    opaque = -1 not in planes or bool((planes[-1] == _FULL_SCALE[header.depth]).all())
    if full and opaque:
        return layer
    # The variant was moved or made partly transparent: lay it over the composite.
    base = np.array(_document_source(document, n_color))
    left, top = max(record.left, 0), max(record.top, 0)
    right, bottom = min(record.right, header.width), min(record.bottom, header.height)
    if right <= left or bottom <= top:
        return base
    crop = (
        slice(top - record.top, bottom - record.top),
        slice(left - record.left, right - record.left),
    )
    alpha = (
        planes[-1][crop].astype(np.float32) / _FULL_SCALE[header.depth]
        if -1 in planes
        else np.ones((bottom - top, right - left), np.float32)
    )
    region = base[:, top:bottom, left:right].astype(np.float32)
    over = layer[(slice(None), *crop)].astype(np.float32)
    blended = over * alpha + region * (1.0 - alpha)
    if header.depth != 32:
        blended = np.clip(np.rint(blended), 0, _FULL_SCALE[header.depth])
    base[:, top:bottom, left:right] = blended.astype(_DTYPES[header.depth])
    return base


def _find_variant(
    document: PSD, path: Path, record_index: int
) -> tuple[LayerRecord, ChannelDataList]:
    """The layer record at ``record_index``: the variant the reader chose."""
    info = layer_records(document)
    if info is None or not 0 <= record_index < len(info.layer_records):
        raise CollageError(
            "the earlier variant to edit is no longer in the file; keep the earlier "
            "[harmonized] group and its layers as they were written",
            path=path,
        )
    record = info.layer_records[record_index]
    if _divider_kind(record) is not None or _is_special(record):
        raise CollageError(
            f"layer {_name(record)!r} is not a pixel layer; pick another variant", path=path
        )
    return record, info.channel_image_data[record_index]


def _divider_kind(record: LayerRecord) -> SectionDivider | None:
    blocks = record.tagged_blocks
    setting = blocks.get_data(Tag.NESTED_SECTION_DIVIDER_SETTING) or blocks.get_data(
        Tag.SECTION_DIVIDER_SETTING
    )
    if setting is None or setting.kind == SectionDivider.OTHER:
        return None
    return setting.kind


def _is_special(record: LayerRecord) -> bool:
    """Text, smart object, adjustment or fill layers: not plain pixels."""
    special = (
        Tag.TYPE_TOOL_OBJECT_SETTING,
        Tag.SMART_OBJECT_LAYER_DATA1,
        Tag.SMART_OBJECT_LAYER_DATA2,
        Tag.PLACED_LAYER1,
        Tag.PLACED_LAYER2,
        Tag.SOLID_COLOR_SHEET_SETTING,
        Tag.GRADIENT_FILL_SETTING,
        Tag.PATTERN_FILL_SETTING,
    )
    return any(tag in record.tagged_blocks for tag in special)


def _name(record: LayerRecord) -> str:
    return record.tagged_blocks.get_data(Tag.UNICODE_LAYER_NAME, record.name)


# --- building the new layers -------------------------------------------------------


def _quantise(values: np.ndarray, depth: int) -> np.ndarray:
    """Float samples on the 0..full-scale range -> raw samples at ``depth``."""
    if depth == 32:
        return values.astype(_DTYPES[32])
    rounded = np.rint(values)
    np.clip(rounded, 0.0, _FULL_SCALE[depth], out=rounded)
    return rounded.astype(_DTYPES[depth])


def _strips(pin: np.ndarray | None, height: int, width: int) -> list[_Strip]:
    """Rows a strip at a time, each with the columns the pin leaves open in it.

    Computed once for all variants: the pin is the same for each.
    """
    rows = max(1, _STRIP_PIXELS // width)
    strips = []
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        if pin is None:
            strips.append(_Strip(top, bottom, slice(0, width), None))
            continue
        weight = np.asarray(pin[top:bottom], np.float32)
        open_columns = np.flatnonzero((weight < 1.0).any(axis=0))
        if not len(open_columns):
            strips.append(_Strip(top, bottom, None, None))
            continue
        box = slice(int(open_columns[0]), int(open_columns[-1]) + 1)
        strips.append(_Strip(top, bottom, box, weight[:, box]))
    return strips


@dataclass(frozen=True)
class _Strip:
    top: int
    bottom: int
    box: slice | None  # the columns with pixels to convert; None: all kept
    weight: np.ndarray | None  # the pin in that box; None: no pin


def _native_planes(
    variant: np.ndarray,
    mode: str,
    icc: bytes | None,
    depth: int,
    strips: list[_Strip],
    pinned: np.ndarray | None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """sRGB variant -> (channels, H, W) raw samples in the document's mode and depth.

    Where pin == 1 the source's raw samples are copied, so the output equals the
    source bit for bit at any depth. Where 0 < pin < 1 they are mixed in at full
    scale before rounding, ``source * pin + new * (1 - pin)``. Rows go a strip at a
    time through one float32 buffer, and only the columns the pin leaves open are
    converted (an edit of one layer converts about its box). ``out``: the previous
    variant's planes, reused: the pinned pixels outside the boxes are already there.
    """
    height, width = variant.shape[:2]
    channels = _CHANNELS[mode]
    fresh = out is None
    if out is None:
        out = np.empty((channels, height, width), _DTYPES[depth])
    buffer = np.empty(channels * max(s.bottom - s.top for s in strips) * width, np.float32)
    for strip in strips:
        rows = slice(strip.top, strip.bottom)
        target = out[:, rows]
        if fresh and pinned is not None:
            target[...] = pinned[:, rows]
        if strip.box is None:
            continue
        box = strip.box
        blend = (strip.weight, pinned[:, rows, box]) if pinned is not None else None
        _convert(variant[rows, box], target[:, :, box], mode, icc, depth, buffer, blend)
        if blend is not None:
            # copyto(where=) rather than target[:, mask]: 25x faster on big masks.
            np.copyto(target[:, :, box], blend[1], where=(blend[0] >= 1.0)[None])
    return out


def _convert(
    part: np.ndarray,
    target: np.ndarray,
    mode: str,
    icc: bytes | None,
    depth: int,
    buffer: np.ndarray,
    blend: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """One strip of :func:`_native_planes`: sRGB floats -> raw samples in ``target``.

    ``blend`` (weights, source samples) mixes fractional pins in before rounding.
    """
    scale = _FULL_SCALE[depth]
    channels, rows, columns = target.shape
    # Pixel-interleaved like the variant: one contiguous pass in, planes only on the way out.
    work = buffer[: target.size].reshape(rows, columns, channels)
    factor = scale  # from the sRGB range to the raw range
    if part.dtype == np.uint8 and mode == "RGB" and not icc:
        native, factor = part, scale / 255.0  # one pass: 255 -> full scale
    else:
        rgb = part.astype(np.float32) / 255.0 if part.dtype == np.uint8 else part
        native = from_srgb(np.asarray(rgb, np.float32), mode, icc)
    if mode == "CMYK":  # PSD stores ink left: full scale = no ink
        np.subtract(1.0, native, out=work)
        work *= scale
    else:
        np.multiply(native, factor, out=work)
    if depth == 32:  # no rounding below: keep the new values in range here
        np.clip(work, 0.0, 1.0, out=work)
    if blend is not None:
        weight, pinned = blend
        partial = (weight > 0.0) & (weight < 1.0)
        count = int(np.count_nonzero(partial))
        if 0 < count <= partial.size // _SPARSE_BLEND_DIVISOR:  # feathered edges only
            share = weight[partial][:, None]
            kept = pinned[:, partial].T.astype(np.float32)
            work[partial] = kept * share + work[partial] * (1.0 - share)
        elif count:  # mostly fractional: dense passes beat fancy indexing
            kept = pinned.transpose(1, 2, 0).astype(np.float32)
            share = weight[..., None]
            np.copyto(work, kept * share + work * (1.0 - share), where=partial[..., None])
    planar = work.transpose(2, 0, 1)
    if depth == 32:
        target[...] = planar  # casts (and byte-swaps) into the raw sample type
        return
    # Clipping first makes rounding straight into the raw type safe: one pass fewer.
    np.clip(work, 0.0, scale, out=work)
    np.rint(planar, out=target, casting="unsafe")


def _variant_layers(
    variants: Sequence[np.ndarray],
    names: Sequence[str],
    first_id: int,
    target: tuple[str, bytes | None, FileHeader, Compression],
    pin: np.ndarray | None,
    pinned: np.ndarray | None,
    keep_samples: bool,
) -> tuple[list[tuple[LayerRecord, ChannelDataList]], np.ndarray | None, list[EncodedPlane] | None]:
    """The variants' layer records (first visible), one variant converted at a time.

    Also returns what the flattened image is made of: the first variant's RLE rows
    (8 bits), and its samples only when those will not do (``keep_samples``: an overlay
    goes on top; or another codec).
    """
    mode, icc, header, codec = target
    records: list[tuple[LayerRecord, ChannelDataList]] = []
    merged: np.ndarray | None = None
    merged_rle: list[EncodedPlane] | None = None
    opaque = _opaque_channel(header)  # the same bytes for every variant: encoded once
    strips = _strips(pin, header.height, header.width)
    scratch: np.ndarray | None = None  # one variant's planes, reused for the next
    for index, name in enumerate(names):
        variant = variants[index]  # fetched once: it may be upscaled on access
        _check_variant(index, variant, header)
        planes = _native_planes(variant, mode, icc, header.depth, strips, pinned, scratch)
        del variant
        encoded = _encode_planes(planes, codec, header)
        layer_id = first_id + index
        records.append(_pixel_layer(encoded, name, index == 0, layer_id, opaque, header))
        if index == 0:
            merged_rle = [plane for plane, _ in encoded if plane is not None]
            if keep_samples or len(merged_rle) != planes.shape[0]:
                merged = planes  # the flattened image needs the samples themselves
        scratch = planes if planes is not merged else None
        del planes, encoded
    return records, merged, merged_rle


def _layer_name(record: LayerRecord, name: str) -> None:
    """Give a record a Unicode name that every writer and reader copes with.

    psd-tools pitfall: ``save()`` encodes the legacy Pascal name as MacRoman and
    raises half-way through writing on anything else. So the Pascal name gets a
    MacRoman rendering ('?' for what it cannot hold, cut to 255 bytes; ImageMagick
    shows this one) and the real name goes to the 'luni' block Photoshop reads.
    """
    legacy = name.encode("macroman", errors="replace")[:_MAX_NAME]
    record.name = legacy.decode("macroman")
    record.tagged_blocks.set_data(Tag.UNICODE_LAYER_NAME, name)


def _opaque_channel(header: FileHeader) -> ChannelData:
    """The transparency channel of a full-canvas opaque layer (RLE at 8 bits, ZIP at 16)."""
    depth = header.depth
    opaque = np.full((header.height, header.width), _FULL_SCALE[depth], _DTYPES[depth])
    return _encode_planes(opaque[None], _transparency_compression(depth), header)[0][1]


def _encode_planes(
    planes: np.ndarray, codec: Compression, header: FileHeader
) -> list[tuple[EncodedPlane | None, ChannelData]]:
    """Each raw plane as stored channel data, with its RLE rows when they were made here.

    RLE at 8 bits goes through :mod:`.rle` (vectorised, ~2x psd-tools' ``encode_rle``
    on photographic planes); other codecs through psd-tools' ``compress``.
    """
    _, height, width = planes.shape
    encoded: list[tuple[EncodedPlane | None, ChannelData]] = []
    for plane in planes:
        if codec == Compression.RLE and header.depth == 8:
            rows = encode_plane(plane, header.version)
            data = ChannelData(compression=codec, data=rows.payload)
            encoded.append((rows, data))
        else:
            data = ChannelData(compression=codec)
            data.set_data(plane.tobytes(), width, height, header.depth, header.version)
            encoded.append((None, data))
    return encoded


def _pixel_layer(
    encoded: list[tuple[EncodedPlane | None, ChannelData]],
    name: str,
    visible: bool,
    layer_id: int,
    opaque: ChannelData,
    header: FileHeader,
) -> tuple[LayerRecord, ChannelDataList]:
    """A full-canvas opaque pixel layer from encoded colour planes.

    Built as records rather than with ``PixelLayer.frompil``: psd-tools pitfall, an
    RGBA image given to ``frompil`` on a 3-channel document gets its alpha as a
    *layer mask* instead of the transparency channel. Here the transparency channel
    (-1, opaque) and one channel per colour plane are written explicitly.
    """
    record = LayerRecord(
        top=0,
        left=0,
        bottom=header.height,
        right=header.width,
        blend_mode=BlendMode.NORMAL,
        opacity=255,
        flags=LayerFlags(visible=visible),
        tagged_blocks=TaggedBlocks(),
    )
    _layer_name(record, name)
    record.tagged_blocks.set_data(Tag.LAYER_ID, layer_id)
    channels = ChannelDataList()
    sources = [(ChannelID.TRANSPARENCY_MASK, opaque)]
    sources += [(ChannelID(index), data) for index, (_, data) in enumerate(encoded)]
    for channel_id, data in sources:
        record.channel_info.append(ChannelInfo(id=channel_id, length=channel_block_length(data)))
        channels.append(ChannelData(compression=data.compression, data=data.data))
    return record, channels


def _group_record(
    name: str, layer_id: int, n_color: int, *, end: bool
) -> tuple[LayerRecord, ChannelDataList]:
    """The group's own record (``end=False``) or its end marker (``end=True``).

    psd-tools pitfall: ``Group.new`` always gives these records the four RGB channel
    ids (-1, 0, 1, 2), and other readers (ImageMagick, GIMP) reject a CMYK or
    Grayscale file whose records do not list the document's own channels. Here the
    empty channels are the transparency plus one per colour channel of the mode,
    as Photoshop writes them.
    """
    record = LayerRecord(
        blend_mode=BlendMode.NORMAL,
        flags=LayerFlags(visible=True, pixel_data_irrelevant=True),
        tagged_blocks=TaggedBlocks(),
    )
    _layer_name(record, name)
    if end:
        record.tagged_blocks.set_data(
            Tag.SECTION_DIVIDER_SETTING, kind=SectionDivider.BOUNDING_SECTION_DIVIDER
        )
    else:
        record.tagged_blocks.set_data(
            Tag.SECTION_DIVIDER_SETTING,
            kind=SectionDivider.OPEN_FOLDER,
            signature=b"8BIM",
            blend_mode=BlendMode.PASS_THROUGH,
        )
    record.tagged_blocks.set_data(Tag.LAYER_ID, layer_id)
    channels = ChannelDataList()
    for index in range(-1, n_color):
        channels.append(ChannelData(compression=Compression.RAW, data=b""))
        record.channel_info.append(ChannelInfo(id=ChannelID(index), length=2))
    return record, channels


def _set_merged_image(
    document: PSD,
    planes: np.ndarray | None,
    merged_alpha: bool,
    encoded: list[EncodedPlane] | None,
    n_color: int,
) -> None:
    """Replace the flattened image with the visible variant instead of recompositing.

    Extra channels (saved selections, spot colours) keep their stored data; when the
    layer count is negative the first extra channel is the composite's transparency,
    which the opaque full-canvas variant makes fully opaque. ``encoded``: the colour
    planes' RLE rows when the first variant's layer already made them (8 bits); then
    ``planes`` may be None, so that the samples need not be kept.
    """
    header = document.header
    shape = (header.height, header.width)
    extra: list[np.ndarray] = []
    if header.channels > n_color:
        stored = _merged_planes(document)
        for index in range(n_color, header.channels):
            if index == n_color and merged_alpha:
                extra.append(np.full(shape, _FULL_SCALE[header.depth], _DTYPES[header.depth]))
            else:
                extra.append(stored[index])
        del stored
    image = document.image_data
    if header.depth == 8:
        # Only RAW and RLE are defined here; RLE beyond 8 bits is what ag-psd misreads.
        if encoded is None or len(encoded) != n_color:
            assert planes is not None
            encoded = [encode_plane(plane, header.version) for plane in planes]
        encoded = encoded + [encode_plane(plane, header.version) for plane in extra]
        image.compression = Compression.RLE
        image.data = rle_image_data(encoded, header.version)
        return
    assert planes is not None
    image.compression = Compression.RAW
    image.set_data([plane.tobytes() for plane in [*planes, *extra]], header)


def backup_path(source: Path) -> Path:
    return source.with_name(source.name + ".bak")


def _backup(source: Path) -> Path:
    """Copy the original to ``NAME.psd.bak`` (atomically) before replacing it in place.

    An existing backup is kept: it holds the very first original, before any run.
    """
    backup = backup_path(source)
    if backup.exists() or backup.is_symlink():
        return backup
    with open(source, "rb") as original, atomic_open(backup, like=source) as copy:
        shutil.copyfileobj(original, copy, 1 << 20)
    return backup

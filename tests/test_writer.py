"""Writing variants back into PSD/PSB files, checked with psd-tools, ImageMagick and ag-psd."""

from __future__ import annotations

import errno
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from psd_tools import PSDImage
from psd_tools.constants import Resource, Tag
from psd_tools.psd import PSD
from psd_tools.psd.image_resources import ImageResource, VersionInfo

from psd_collage.errors import CollageError, UnsupportedDocument
from psd_collage.psd.boundary import document_structure, layer_channels, layer_records
from psd_collage.psd.color import from_srgb
from psd_collage.psd.reader import record_index
from psd_collage.psd.writer import write_variants
from tests import readers

NAMES = ["seed 1234", "seed 99 ✨ вариант"]
GROUP = "[harmonized] 2026-11-25 14:03 tiny 🎨"
_DTYPE = {8: np.dtype("u1"), 16: np.dtype(">u2"), 32: np.dtype(">f4")}
_SCALE = {8: 255.0, 16: 65535.0, 32: 1.0}
_MODE = {"RGB": "RGB", "L": "GRAYSCALE", "CMYK": "CMYK"}
_CHANNELS = {"RGB": 3, "GRAYSCALE": 1, "CMYK": 4}


# --- building inputs ---------------------------------------------------------------


def build(
    path: Path,
    mode: str = "RGB",
    depth: int = 8,
    size: tuple[int, int] = (32, 24),
    *,
    psb: bool = False,
    alpha_channel: bool = False,
) -> Path:
    """A small layered document: background, a half-transparent object, a group, a hidden layer."""
    width, height = size
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    white = (1.0,) * (channels + alpha_channel)
    psd = PSDImage.new(mode + ("A" if alpha_channel else ""), size, color=white, depth=depth)
    if psb:  # before any layer: PSB's RLE row counts are 4 bytes wide
        document_structure(psd).header.version = 2
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = np.stack(
        [(xx / width + 0.25 * k + yy / (3 * height)) % 1.0 for k in range(channels)], -1
    )
    psd.create_pixel_layer_from_array(ramp, name="Background")
    obj = np.concatenate(
        [np.full((10, 12, channels), 0.3, np.float32), np.full((10, 12, 1), 0.6, np.float32)], -1
    )
    psd.create_pixel_layer_from_array(obj, name="a red car [noise=0.4]", top=5, left=6)
    if mode != "CMYK":  # psd-tools' own groups carry RGB channel ids: unreadable in CMYK
        group = psd.create_group(name="group")
        group.name = "группа"  # psd-tools' save() raises on a non-MacRoman name at creation
        group.create_pixel_layer_from_array(np.full((8, 8, channels), 0.8, np.float32), name="c")
    hidden = psd.create_pixel_layer_from_array(np.full((4, 4, channels), 0.1, np.float32), name="h")
    hidden.visible = False
    psd.save(path)
    return path


def random_variants(height: int, width: int, count: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((height, width, 3), dtype=np.float32) for _ in range(count)]


def stripes_pin(height: int, width: int) -> np.ndarray:
    """Left third kept (1), middle third half (0.5), right third free (0)."""
    pin = np.zeros((height, width), np.float32)
    pin[:, : width // 3] = 1.0
    pin[:, width // 3 : 2 * width // 3] = 0.5
    return pin


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- reading outputs ---------------------------------------------------------------


def fresh_record(path: Path) -> PSD:
    with open(path, "rb") as fh:
        return PSD.read(fh)


_PARSED: dict[tuple, PSD] = {}


def read_record(path: Path) -> PSD:
    """Parsed once per file version (psd-tools takes ~1 s on pen-text.psd); don't mutate."""
    stat = Path(path).stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        if len(_PARSED) >= 4:  # a few documents, not the whole session's
            del _PARSED[next(iter(_PARSED))]
        _PARSED[key] = fresh_record(path)
    return _PARSED[key]


def merged_raw(document: PSD) -> np.ndarray:
    """Stored flattened image as (H, W, channels) raw samples."""
    header = document.header
    data = document.image_data.get_data(header, split=False)
    planes = np.frombuffer(data, _DTYPE[header.depth])
    return planes.reshape(header.channels, header.height, header.width).transpose(1, 2, 0)


def layer_raw(layer, header) -> tuple[np.ndarray, np.ndarray | None]:
    """A psd-tools layer's colour planes (H, W, C) and transparency, as stored."""
    width, height = layer.width, layer.height  # the record's box, as the channels are stored
    planes = {}
    for info, data in layer_channels(layer):
        raw = data.get_data(width, height, header.depth, header.version)
        planes[int(info.id)] = np.frombuffer(raw, _DTYPE[header.depth]).reshape(height, width)
    colour = np.stack([planes[i] for i in sorted(k for k in planes if k >= 0)], -1)
    return colour, planes.get(-1)


def expected_native(variant: np.ndarray, mode: str, depth: int, icc: bytes | None) -> np.ndarray:
    """The variant in the document's stored convention, as floats on the raw scale."""
    native = from_srgb(variant, mode, icc)
    if mode == "CMYK":
        native = 1.0 - native
    return native * _SCALE[depth]


def serialized(element, *args) -> bytes:
    buffer = io.BytesIO()
    element.write(buffer, *args)
    return buffer.getvalue()


def assert_originals_untouched(source: Path, output: Path, added: int) -> None:
    """Header, colour data, image resources and every original layer record byte-identical."""
    before, after = read_record(source), read_record(output)
    version = before.header.version
    assert serialized(after.header) == serialized(before.header)
    assert serialized(after.color_mode_data) == serialized(before.color_mode_data)
    assert serialized(after.image_resources, "macroman") == serialized(
        before.image_resources, "macroman"
    )
    old, new = layer_records(before), layer_records(after)
    count = len(old.layer_records) if old else 0
    assert len(new.layer_records) == count + added
    for index in range(count):
        old_record, new_record = old.layer_records[index], new.layer_records[index]
        blocks = new_record.tagged_blocks
        added_id = Tag.LAYER_ID not in old_record.tagged_blocks
        if added_id:  # a record without a Photoshop layer id gets one, as Photoshop does
            assert blocks.get_data(Tag.LAYER_ID) > 0
            saved = blocks[Tag.LAYER_ID]
            del blocks[Tag.LAYER_ID]
        try:
            assert serialized(new_record, "macroman", version) == serialized(
                old_record, "macroman", version
            ), f"layer record {index} changed"
        finally:
            if added_id:
                blocks[Tag.LAYER_ID] = saved
        assert serialized(new.channel_image_data[index]) == serialized(
            old.channel_image_data[index]
        ), f"pixels of layer {index} changed"
    sign = -1 if old is not None and old.layer_count < 0 else 1
    assert new.layer_count == sign * (count + added)
    # Document-wide blocks: patterns, embedded/linked smart-object data, filter masks...
    old_info, new_info = before.layer_and_mask_information, after.layer_and_mask_information
    layer_blocks = (Tag.LAYER_16, Tag.LAYER_32)
    old_blocks = {k: v for k, v in (old_info.tagged_blocks or {}).items() if k not in layer_blocks}
    new_blocks = {k: v for k, v in (new_info.tagged_blocks or {}).items() if k not in layer_blocks}
    assert list(new_blocks) == list(old_blocks)
    for key, block in old_blocks.items():
        assert serialized(new_blocks[key], version) == serialized(block, version), key
    if old_info.global_layer_mask_info is not None:
        assert serialized(new_info.global_layer_mask_info) == serialized(
            old_info.global_layer_mask_info
        )


def harmonized_group(path: Path):
    psd = PSDImage(read_record(path))
    group = psd[-1]
    assert group.kind == "group"
    return psd, group


def check_group(path: Path, names: list[str], group_name: str = GROUP):
    """The new group is on top, named, visible, with one full-canvas layer per variant."""
    psd, group = harmonized_group(path)
    assert group.name == group_name
    assert group.visible
    top_first = list(reversed(list(group)))
    assert [layer.name for layer in top_first] == names
    assert [layer.visible for layer in top_first] == [True] + [False] * (len(names) - 1)
    for layer in top_first:
        assert layer.kind == "pixel"
        assert (layer.left, layer.top, layer.right, layer.bottom) == (0, 0, psd.width, psd.height)
    return psd, top_first


# --- psd-tools round trip over modes and depths -------------------------------------

MODES = [
    ("RGB", 8, False),
    ("RGB", 16, False),
    ("RGB", 32, False),
    ("L", 8, False),
    ("CMYK", 8, False),
    ("CMYK", 16, False),
    ("RGB", 8, True),
]


@pytest.mark.parametrize(("mode", "depth", "psb"), MODES)
def test_variants_are_stored_in_the_documents_own_mode_and_depth(tmp_path, mode, depth, psb):
    source = build(tmp_path / "in.psd", mode, depth, psb=psb)
    digest = sha256(source)
    width, height = 32, 24
    variants = random_variants(height, width)
    pin = stripes_pin(height, width)
    output = write_variants(source, tmp_path / "out.psd", variants, NAMES, GROUP, pin=pin)

    assert sha256(source) == digest
    assert_originals_untouched(source, output, added=len(variants) + 2)
    psd, layers = check_group(output, NAMES)
    document = read_record(output)
    assert document.header.version == (2 if psb else 1)
    assert document.header.depth == depth
    source_pixels = merged_raw(read_record(source))[..., : _CHANNELS[_MODE[mode]]]

    kept, half, free = pin == 1.0, pin == 0.5, pin == 0.0
    step = {8: 0.5 + 1e-3, 16: 0.5 + 1e-2, 32: 1e-6}[depth]  # float32 rounding at 16 bits
    for layer, variant in zip(layers, variants, strict=True):
        colour, transparency = layer_raw(layer, document.header)
        assert transparency is not None and (transparency == _SCALE[depth]).all(), "not opaque"
        # Transparency plus colour channels only: no layer mask (-2), as frompil would add.
        ids = [int(info.id) for info, _ in layer_channels(layer)]
        assert ids == list(range(-1, _CHANNELS[_MODE[mode]]))
        # Pinned pixels are the source's, bit for bit.
        assert np.array_equal(colour[kept], source_pixels[kept])
        # Free pixels are the variant within quantisation.
        new = expected_native(variant, _MODE[mode], depth, None)
        values = colour.astype(np.float64)
        assert np.abs(values[free] - new[free]).max() <= step
        mix = 0.5 * source_pixels.astype(np.float64) + 0.5 * new
        assert np.abs(values[half] - mix[half]).max() <= step
        # The variants really differ where they are free (not a copy of the source).
        assert np.abs(values[free] - source_pixels[free]).mean() > 0.05 * _SCALE[depth]
    # The flattened image is the visible variant, not a recomposite.
    visible, _ = layer_raw(layers[0], document.header)
    assert np.array_equal(merged_raw(document), visible)


def test_feathered_pin_edges_mix_source_and_variant(tmp_path):
    """A thin band of partial weights (the feathered edge of a pinned region)."""
    source = build(tmp_path / "in.psd", "RGB", 8, size=(64, 48))
    variants = random_variants(48, 64, count=1)
    pin = np.zeros((48, 64), np.float32)
    pin[:, :30] = 1.0
    pin[:, 30:33] = [0.75, 0.5, 0.25]
    output = write_variants(source, tmp_path / "out.psd", variants, NAMES[:1], GROUP, pin=pin)
    _, layers = check_group(output, NAMES[:1])
    colour, _ = layer_raw(layers[0], read_record(output).header)
    src = merged_raw(read_record(source)).astype(np.float64)
    new = expected_native(variants[0], "RGB", 8, None)
    weight = pin[..., None]
    mix = src * weight + new * (1.0 - weight)
    assert np.abs(colour.astype(np.float64) - mix).max() <= 0.5 + 1e-3
    assert np.array_equal(colour[:, :30], src[:, :30].astype(np.uint8))


def test_group_records_carry_the_documents_channel_ids(tmp_path):
    source = build(tmp_path / "in.psd", "CMYK", 8)
    output = write_variants(source, tmp_path / "out.psd", random_variants(24, 32), NAMES, GROUP)
    records = layer_records(read_record(output)).layer_records
    for record in (records[-1], records[-4]):  # the group and its end marker
        assert [int(info.id) for info in record.channel_info] == [-1, 0, 1, 2, 3]


# --- independent readers --------------------------------------------------------------

needs_imagemagick = pytest.mark.skipif(
    not readers.imagemagick(), reason=readers.IMAGEMAGICK_MISSING
)


@needs_imagemagick
@pytest.mark.parametrize(
    ("mode", "depth", "psb", "raw"),
    [
        ("RGB", 8, False, "rgb"),
        ("RGB", 16, False, "rgb"),
        ("RGB", 32, False, "rgb"),
        ("L", 8, False, "gray"),
        ("CMYK", 8, False, "cmyk"),
        ("RGB", 8, True, "rgb"),
    ],
)
def test_imagemagick_reads_the_new_layers_and_merged_image(tmp_path, mode, depth, psb, raw):
    source = build(tmp_path / "in.psd", mode, depth, psb=psb)
    variants = random_variants(24, 32, seed=3)
    output = write_variants(source, tmp_path / "out.psd", variants, NAMES, GROUP)
    header = read_record(output).header
    _, layers = check_group(output, NAMES)

    entries = readers.identify_layers(output)
    before = readers.identify_layers(source)
    assert len(entries) == len(before) + 2  # ImageMagick lists pixel layers, not groups
    assert entries[: len(before)][1:] == before[1:]  # originals as they were
    top, below = entries[-1], entries[-2]  # ImageMagick lists bottom to top
    # The legacy name is the MacRoman rendering; the Unicode one is in 'luni'.
    assert (top["label"], below["label"]) == ("seed 1234", "seed 99 ? ???????")
    for entry in (top, below):
        assert (entry["width"], entry["height"], entry["x"], entry["y"]) == (32, 24, 0, 0)
        assert entry["depth"] == depth

    def same(index: int, stored: np.ndarray) -> bool:
        if depth == 32:  # ImageMagick Q16 gives floats as 16-bit samples
            seen = readers.magick_pixels(output, index, raw, 16) / 65535.0
            return np.abs(seen - stored).max() <= 1.0 / 65535
        seen = readers.magick_pixels(output, index, raw, depth)
        expected = _SCALE[depth] - stored.astype(np.float64) if raw == "cmyk" else stored
        return np.array_equal(seen, expected.astype(seen.dtype))

    for index, layer in ((top["index"], layers[0]), (below["index"], layers[1])):
        assert same(index, layer_raw(layer, header)[0])
    assert same(0, layer_raw(layers[0], header)[0])  # the merged image is the visible variant


needs_ag_psd = pytest.mark.skipif(not readers.ag_psd(), reason=readers.AG_PSD_MISSING)


@needs_ag_psd
@pytest.mark.parametrize(
    ("mode", "depth", "psb"),
    [("RGB", 8, False), ("RGB", 16, False), ("RGB", 32, False), ("L", 8, False), ("RGB", 8, True)],
)
def test_ag_psd_reads_names_visibility_and_pixels(tmp_path, mode, depth, psb):
    source = build(tmp_path / "in.psd", mode, depth, psb=psb)
    variants = random_variants(24, 32, seed=5)
    output = write_variants(source, tmp_path / "out.psd", variants, NAMES, GROUP)
    header = read_record(output).header
    _, layers = check_group(output, NAMES)

    document = readers.ag_psd_read(output)
    original = readers.ag_psd_read(source)
    group = document["children"][-1]  # ag-psd lists bottom to top
    assert group["group"] and group["name"] == GROUP and not group["hidden"]
    assert [child["name"] for child in reversed(group["children"])] == NAMES
    assert [child["hidden"] for child in reversed(group["children"])] == [False, True]
    strip = {"pixels", "children"}
    assert [{k: v for k, v in c.items() if k not in strip} for c in document["children"][:-1]] == [
        {k: v for k, v in c.items() if k not in strip} for c in original["children"]
    ]
    assert document["bitsPerChannel"] == depth

    def same(rgba: np.ndarray, stored: np.ndarray) -> bool:
        if rgba.dtype == np.uint8 and depth == 16:
            stored = stored >> 8  # ag-psd's 8-bit view of 16-bit layers
        if stored.shape[2] == 1:  # ag-psd expands gray to RGB
            stored = np.repeat(stored, 3, axis=2)
        return np.array_equal(rgba[..., :3], stored.astype(rgba.dtype))

    for child, layer in zip(reversed(group["children"]), layers, strict=True):
        assert (child["left"], child["top"], child["right"], child["bottom"]) == (0, 0, 32, 24)
        rgba = readers.ag_psd_pixels(child["pixels"], 32, 24)
        stored, _ = layer_raw(layer, header)
        assert same(rgba, stored)
        assert (rgba[..., 3] == (1.0 if depth == 32 else np.iinfo(rgba.dtype).max)).all()
    visible, _ = layer_raw(layers[0], header)
    assert same(readers.ag_psd_pixels(document["composite"], 32, 24), visible)


def mixed_rows_variant(height: int, width: int, seed: int) -> np.ndarray:
    """Rows of every PackBits kind: flat, half flat half noise, noise, one lone run."""
    rng = np.random.default_rng(seed)
    variant = rng.random((height, width, 3), dtype=np.float32)
    variant[: height // 4] = 0.5  # flat rows: runs
    variant[height // 4 : height // 2, : width // 2] = 0.25  # half runs
    variant[height - 3, 7:12] = 0.75  # a short run inside a literal row
    return variant


@pytest.mark.parametrize("width", [1, 127, 128, 129, 300])
@pytest.mark.parametrize("version", [1, 2])
def test_packbits_rows_of_every_kind_decode_exactly(width, version):
    from psd_tools.compression import decode_rle

    from psd_collage.psd.rle import encode_plane, image_data

    plane = np.rint(mixed_rows_variant(16, width, seed=width)[..., 0] * 255).astype(np.uint8)
    encoded = encode_plane(plane, version)
    payload = encoded.payload
    assert decode_rle(payload, width, 16, 8, version) == plane.tobytes()
    both = image_data([encoded, encode_plane(plane[::-1].copy(), version)], version)
    assert decode_rle(both, width, 32, 8, version) == plane.tobytes() + plane[::-1].tobytes()
    if width >= 128:  # flat rows still shrink: runs are found where they pay
        assert len(payload) < 0.9 * plane.size
    flat = np.full((16, width), 255, np.uint8)  # the opaque transparency plane
    assert decode_rle(encode_plane(flat, version).payload, width, 16, 8, version) == flat.tobytes()


@pytest.mark.parametrize("psb", [False, True])
def test_wide_packbits_layers_read_the_same_by_every_reader(tmp_path, psb):
    """Rows longer than one literal packet, of both kinds, in layers and the merged image."""
    height, width = 20, 300
    source = build(tmp_path / "in.psd", size=(width, height), psb=psb)
    variants = [mixed_rows_variant(height, width, seed) for seed in (1, 2)]
    output = write_variants(source, tmp_path / "out.psd", variants, NAMES, GROUP)
    expected = [np.rint(variant * 255).astype(np.uint8) for variant in variants]
    header = read_record(output).header
    _, layers = check_group(output, NAMES)
    for layer, want in zip(layers, expected, strict=True):
        colour, alpha = layer_raw(layer, header)
        assert np.array_equal(colour, want)
        assert (alpha == 255).all()
    assert np.array_equal(merged_raw(read_record(output)), expected[0])
    if readers.imagemagick():
        entries = readers.identify_layers(output)
        assert np.array_equal(readers.magick_pixels(output, 0, "rgb", 8), expected[0])
        top, below = entries[-1]["index"], entries[-2]["index"]
        assert np.array_equal(readers.magick_pixels(output, top, "rgb", 8), expected[0])
        assert np.array_equal(readers.magick_pixels(output, below, "rgb", 8), expected[1])
    if readers.ag_psd():
        document = readers.ag_psd_read(output)
        children = list(reversed(document["children"][-1]["children"]))
        for child, want in zip(children, expected, strict=True):
            assert np.array_equal(
                readers.ag_psd_pixels(child["pixels"], width, height)[..., :3], want
            )
        composite = readers.ag_psd_pixels(document["composite"], width, height)
        assert np.array_equal(composite[..., :3], expected[0])


@pytest.mark.parametrize(("mode", "depth"), [("RGB", 8), ("RGB", 16), ("CMYK", 8), ("L", 8)])
def test_uint8_variants_write_the_same_layers_as_their_float_values(tmp_path, mode, depth):
    """An upscaled variant comes as uint8 (a quarter of the memory): same pixels as floats."""
    source = build(tmp_path / "in.psd", mode, depth)
    rng = np.random.default_rng(4)
    as_u8 = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(2)]
    as_float = [variant.astype(np.float32) / 255.0 for variant in as_u8]
    pin = stripes_pin(24, 32)
    outputs = []
    for name, variants in (("u8", as_u8), ("float", as_float)):
        output = tmp_path / f"{name}.psd"
        write_variants(source, output, variants, NAMES, GROUP, pin=pin)
        outputs.append(output)
    header = read_record(outputs[0]).header
    pairs = zip(check_group(outputs[0], NAMES)[1], check_group(outputs[1], NAMES)[1], strict=True)
    for from_u8, from_float in pairs:
        assert np.array_equal(layer_raw(from_u8, header)[0], layer_raw(from_float, header)[0])


# --- real Photoshop files -------------------------------------------------------------

FIXTURES = [
    "layer_comps.psd",  # Cyrillic names, layer comps, colour labels, vector masks
    "layer-name-emoji.psd",
    "16bit5x5.psd",
    "pen-text.psd",  # 32-bit, text layers
    "gray1.psd",
    "adjustments/curves_cmyk.psd",  # CMYK with ICC, groups, adjustment layers
    "adjustments/posterize_16bits_cmyk.psd",
    "2layers.psb",
    "placedLayer.psd",  # smart objects
    "text.psd",
    "background-red-opacity-80.psd",  # merged image with transparency (negative count)
    "0layers.psb",
]


@pytest.mark.parametrize("name", FIXTURES)
def test_photoshop_files_keep_everything_and_gain_one_group(fixtures_dir, tmp_path, name):
    source = fixtures_dir / name
    digest = sha256(source)
    before = PSDImage(read_record(source))
    icc = before.image_resources.get_data(Resource.ICC_PROFILE)
    mode = before.color_mode.name
    width, height, depth = before.width, before.height, before.depth
    variants = random_variants(height, width, seed=7)
    pin = stripes_pin(height, width)
    output = tmp_path / ("out" + source.suffix)
    write_variants(source, output, variants, NAMES, GROUP, pin=pin)

    assert sha256(source) == digest
    assert_originals_untouched(source, output, added=len(variants) + 2)
    after, layers = check_group(output, NAMES)
    assert [(layer.name, layer.visible, layer.kind) for layer in list(after)[:-1]] == [
        (layer.name, layer.visible, layer.kind) for layer in before
    ]
    document = read_record(output)
    n = _CHANNELS[mode]
    source_pixels = merged_raw(read_record(source))[..., :n]
    kept, free = pin == 1.0, pin == 0.0
    for layer, variant in zip(layers, variants, strict=True):
        colour, _ = layer_raw(layer, document.header)
        assert np.array_equal(colour[kept], source_pixels[kept])
        new = expected_native(variant, mode, depth, icc)
        tolerance = 0.5 + 1e-3 if depth != 32 else 1e-6
        assert np.abs(colour[free].astype(np.float64) - new[free]).max() <= tolerance
    visible, _ = layer_raw(layers[0], document.header)
    merged = merged_raw(document)
    assert np.array_equal(merged[..., :n], visible)
    records = layer_records(document_structure(before))
    if records and records.layer_count < 0:
        assert (merged[..., n] == _SCALE[depth]).all()  # composite transparency: now opaque


@needs_imagemagick
@pytest.mark.parametrize(
    "name", ["layer_comps.psd", "gray1.psd", "adjustments/curves_cmyk.psd", "2layers.psb"]
)
def test_imagemagick_reads_photoshop_files_after_writing(fixtures_dir, tmp_path, name):
    source = fixtures_dir / name
    before = PSDImage.open(source)
    variants = random_variants(before.height, before.width, seed=11)
    output = write_variants(source, tmp_path / ("out" + source.suffix), variants, NAMES, GROUP)
    entries = readers.identify_layers(output)
    original = readers.identify_layers(source)
    assert entries[1 : len(original)] == original[1:]
    assert [(e["label"], e["width"], e["height"], e["x"], e["y"]) for e in entries[-2:]] == [
        ("seed 99 ? ???????", before.width, before.height, 0, 0),
        ("seed 1234", before.width, before.height, 0, 0),
    ]


def test_merged_extra_channels_are_kept_and_transparency_made_opaque(tmp_path):
    source = build(tmp_path / "in.psd", "RGB", 8, alpha_channel=True)
    document = fresh_record(source)
    assert document.header.channels == 4 and layer_records(document).layer_count > 0
    selection = merged_raw(document)[..., 3].copy()
    selection[3:9, 4:20] = 77  # a saved selection with content
    planes = [merged_raw(document)[..., i].tobytes() for i in range(3)] + [selection.tobytes()]
    document.image_data.set_data(planes, document.header)
    with open(source, "wb") as fh:
        document.write(fh)

    output = write_variants(source, tmp_path / "out.psd", random_variants(24, 32), NAMES, GROUP)
    merged = merged_raw(read_record(output))
    assert merged.shape[2] == 4
    assert np.array_equal(merged[..., 3], selection)  # a saved selection stays as it was

    # Negative layer count: the first extra channel is the composite's transparency.
    document.layer_and_mask_information.layer_info.layer_count *= -1
    with open(source, "wb") as fh:
        document.write(fh)
    output = write_variants(source, tmp_path / "out2.psd", random_variants(24, 32), NAMES, GROUP)
    after = read_record(output)
    assert layer_records(after).layer_count < 0
    assert (merged_raw(after)[..., 3] == 255).all()


def test_without_a_real_merged_image_pins_to_the_layer_composite(tmp_path):
    """Files saved without "Maximize compatibility" carry a blank merged image."""
    source = build(tmp_path / "in.psd", "RGB", 8)
    document = fresh_record(source)
    composite = merged_raw(document).copy()
    blank = [np.full((24, 32), 255, np.uint8).tobytes()] * 3
    document.image_data.set_data(blank, document.header)
    document.image_resources[Resource.VERSION_INFO] = ImageResource(
        key=Resource.VERSION_INFO, data=VersionInfo(has_composite=False)
    )
    with open(source, "wb") as fh:
        document.write(fh)
    assert not PSDImage.open(source).has_preview()

    pin = stripes_pin(24, 32)
    output = write_variants(
        source, tmp_path / "out.psd", random_variants(24, 32), NAMES, GROUP, pin=pin
    )
    _, layers = check_group(output, NAMES)
    colour, _ = layer_raw(layers[0], read_record(output).header)
    kept = pin == 1.0
    assert np.abs(colour[kept].astype(int) - composite[kept].astype(int)).max() <= 1
    assert (colour[kept] != 255).any()  # not the blank stored image


# --- editing: pinning to an earlier variant ----------------------------------------------


def test_pin_base_keeps_the_chosen_earlier_variant(tmp_path):
    source = build(tmp_path / "in.psd", "RGB", 16)
    first = write_variants(source, tmp_path / "first.psd", random_variants(24, 32), NAMES, GROUP)
    first_psd, earlier = check_group(first, NAMES)
    header = read_record(first).header
    chosen, _ = layer_raw(earlier[1], header)  # the hidden "seed 99 ..." variant

    pin = np.zeros((24, 32), np.float32)
    pin[4:20, 2:30] = 1.0
    second_names = ["seed 7"]
    second = write_variants(
        first,
        tmp_path / "second.psd",
        random_variants(24, 32, count=1, seed=9),
        second_names,
        "[harmonized] second",
        pin=pin,
        pin_base=record_index(first_psd, earlier[1]),
    )
    assert_originals_untouched(first, second, added=3)
    psd, layers = check_group(second, second_names, "[harmonized] second")
    colour, _ = layer_raw(layers[0], header)
    kept = pin == 1.0
    assert np.array_equal(colour[kept], chosen[kept])
    assert not np.array_equal(colour[~kept], chosen[~kept])
    assert psd[-2].name == GROUP  # the earlier run stays, below the new one

    with pytest.raises(CollageError, match="no longer in the file.*\\[harmonized\\]") as caught:
        write_variants(
            first,
            tmp_path / "third.psd",
            random_variants(24, 32, count=1),
            ["x"],
            "g",
            pin=pin,
            pin_base=999,
        )
    assert "first.psd" in str(caught.value)
    assert not (tmp_path / "third.psd").exists()


def test_pin_base_moved_variant_is_laid_over_the_composite(tmp_path):
    """The user nudged the chosen variant: what it no longer covers comes from the composite."""
    source = build(tmp_path / "in.psd", "RGB", 8)
    first = write_variants(source, tmp_path / "first.psd", random_variants(24, 32), NAMES, GROUP)
    first_psd, earlier = check_group(first, NAMES)
    header = read_record(first).header
    visible, _ = layer_raw(earlier[0], header)  # the stored composite of "first"
    chosen, _ = layer_raw(earlier[1], header)
    document = fresh_record(first)
    index = record_index(first_psd, earlier[1])  # "seed 99 ...", below "seed 1234"
    record = layer_records(document).layer_records[index]
    record.left, record.top, record.right, record.bottom = 3, 2, 35, 26
    moved = tmp_path / "moved.psd"
    with open(moved, "wb") as fh:
        document.write(fh)

    pin = np.ones((24, 32), np.float32)
    output = write_variants(
        moved,
        tmp_path / "out.psd",
        random_variants(24, 32, 1, seed=4),
        ["seed 8"],
        "g",
        pin=pin,
        pin_base=index,
    )
    _, layers = check_group(output, ["seed 8"], "g")
    colour, _ = layer_raw(layers[0], header)
    assert np.array_equal(colour[2:, 3:], chosen[:-2, :-3])
    assert np.array_equal(colour[:2], visible[:2])
    assert np.array_equal(colour[:, :3], visible[:, :3])


# --- files: in place, full disk, bad input ----------------------------------------------


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_in_place_keeps_a_backup_and_replaces_the_file(tmp_path):
    source = build(tmp_path / "poster.psd", "RGB", 8)
    original = source.read_bytes()
    result = write_variants(source, source, random_variants(24, 32), NAMES, GROUP)
    assert result == source
    assert (tmp_path / "poster.psd.bak").read_bytes() == original
    check_group(source, NAMES)
    assert leftovers(tmp_path) == []

    again = build(tmp_path / "other.psd", "RGB", 8)
    write_variants(again, again, random_variants(24, 32), NAMES, GROUP, in_place_backup=False)
    assert not (tmp_path / "other.psd.bak").exists()
    check_group(again, NAMES)


def _disk_full(self, fh, *args, **kwargs):
    fh.write(b"8BPS" + b"\0" * 1000)  # part of a file, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_leaves_no_partial_output(tmp_path, monkeypatch):
    source = build(tmp_path / "in.psd", "RGB", 8)
    digest = sha256(source)
    existing = tmp_path / "existing.psd"
    existing.write_bytes(b"previous output")
    monkeypatch.setattr(PSD, "write", _disk_full)

    with pytest.raises(CollageError, match="disk space"):
        write_variants(source, tmp_path / "new.psd", random_variants(24, 32), NAMES, GROUP)
    assert not (tmp_path / "new.psd").exists()
    with pytest.raises(CollageError, match="disk space"):
        write_variants(source, existing, random_variants(24, 32), NAMES, GROUP)
    assert existing.read_bytes() == b"previous output"
    with pytest.raises(CollageError, match="disk space"):
        write_variants(source, source, random_variants(24, 32), NAMES, GROUP)
    assert sha256(source) == digest
    assert leftovers(tmp_path) == []


def test_bad_input_is_a_user_error_naming_the_file(tmp_path, fixtures_dir):
    not_psd = tmp_path / "notes.psd"
    not_psd.write_text("hello")
    with pytest.raises(CollageError, match="notes.psd"):
        write_variants(not_psd, tmp_path / "o.psd", random_variants(24, 32), NAMES, GROUP)

    truncated = tmp_path / "cut.psd"
    truncated.write_bytes(build(tmp_path / "whole.psd").read_bytes()[:300])
    with pytest.raises(CollageError, match="cut.psd"):
        write_variants(truncated, tmp_path / "o.psd", random_variants(24, 32), NAMES, GROUP)

    lab = fixtures_dir / "colormodes" / "4x4_8bit_lab.psd"
    with pytest.raises(UnsupportedDocument, match="Image > Mode > RGB Color"):
        write_variants(lab, tmp_path / "o.psd", random_variants(4, 4), NAMES, GROUP)
    assert not (tmp_path / "o.psd").exists()


class CountingVariants(Sequence):
    """Variants made on access, as the renderer upscales them: each should be asked once."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images, self.fetched = images, []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        self.fetched.append(index)
        return self.images[index]


def test_lazy_variants_are_fetched_once_each(tmp_path):
    source = build(tmp_path / "in.psd")
    variants = CountingVariants(random_variants(24, 32, count=3))
    output = write_variants(source, tmp_path / "o.psd", variants, ["a", "b", "c"], GROUP)
    assert sorted(variants.fetched) == [0, 1, 2]
    check_group(output, ["a", "b", "c"])


def test_variants_of_the_wrong_size_are_refused(tmp_path):
    source = build(tmp_path / "in.psd")
    with pytest.raises(ValueError, match="shape"):
        write_variants(source, tmp_path / "o.psd", random_variants(10, 10), NAMES, GROUP)
    with pytest.raises(ValueError, match="names"):
        write_variants(source, tmp_path / "o.psd", random_variants(24, 32), NAMES[:1], GROUP)

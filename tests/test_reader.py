"""PSD -> Collage: what a designer's layers, names, locks and text become."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from psd_tools import PSDImage
from psd_tools.constants import Resource, Tag
from psd_tools.psd import PSD

from psd_collage.errors import CollageError, SettingsError, TagError, UnsupportedDocument
from psd_collage.psd import composite, reader
from psd_collage.psd.boundary import layer_records, quiet_psd_tools
from psd_collage.psd.composite import Compositor, intersect
from psd_collage.psd.header import SUPPORTED_MODES, check_header, read_header
from psd_collage.psd.names import HARMONIZED_PREFIX, is_default_name
from psd_collage.psd.reader import read_collage
from psd_collage.psd.writer import write_variants
from psd_collage.settings import LayerOptions, Settings
from tests import readers
from tests.psd_builders import Group, Pixels, build_psd, edit_copy

RED, GREEN, BLUE, SKY = (220, 20, 20), (20, 200, 20), (20, 20, 220), (90, 140, 220)


def names(collage) -> list[str]:
    return [layer.name for layer in collage.layers]


def full_alpha(layer, size) -> np.ndarray:
    out = np.zeros(size[::-1], np.float32)
    left, top, right, bottom = layer.box
    out[top:bottom, left:right] = layer.alpha
    return out


# ---------------------------------------------------------------------------
# Layers, captions, tags, masks
# ---------------------------------------------------------------------------


def test_layers_back_to_front_with_captions_tags_and_cropped_pixels(tmp_path: Path) -> None:
    path = build_psd(
        tmp_path / "a.psd",
        [
            Pixels("a blue sky", (0, 0, 64, 64), SKY),
            Pixels("a red car [noise=0.4, ti]", (10, 30, 40, 50), RED),
            Pixels("Layer 3", (44, 4, 60, 20), GREEN),
        ],
    )
    collage = read_collage(path)
    assert names(collage) == ["a blue sky", "a red car [noise=0.4, ti]", "Layer 3"]
    sky, car, unnamed = collage.layers
    assert [sky.caption, car.caption, unnamed.caption] == ["a blue sky", "a red car", ""]
    assert car.options.noise == 0.4 and car.options.ti is True and car.noise == 0.4
    assert sky.noise == Settings().noise  # no tag: the document default
    assert car.box == (10, 30, 40, 50) and car.pixels.shape == (20, 30, 4)
    assert tuple(car.pixels[5, 5]) == (*RED, 255)
    assert car.sources == ["a red car [noise=0.4, ti]"]
    assert collage.composite.shape == (64, 64, 3) and collage.composite.dtype == np.uint8
    assert tuple(collage.composite[40, 20]) == RED
    assert any("default Photoshop name" in w and "'Layer 3'" in w for w in collage.warnings)
    assert not unnamed.steered and car.steered


def test_visible_masks_apply_occlusion_and_sum_to_one_with_background(tmp_path: Path) -> None:
    path = build_psd(
        tmp_path / "occlusion.psd",
        [
            Pixels("hidden behind", (20, 20, 30, 30), GREEN),  # fully covered by the box above
            Pixels("big box", (10, 10, 50, 50), (200, 0, 0, 255)),
            Pixels("glass", (0, 0, 32, 64), (255, 255, 255, 128)),  # half transparent
        ],
    )
    collage = read_collage(path)
    behind, box, glass = collage.layers
    assert behind.visible_area == pytest.approx(0.0, abs=1e-6)
    half = 128 / 255
    # the box shows fully right of the glass (18 columns), at (1 - glass alpha) under it (22)
    expected_box = (18 * 40 + 22 * 40 * (1 - half)) / 64**2
    assert box.visible_area == pytest.approx(expected_box, rel=1e-3)
    assert glass.visible_area == pytest.approx(32 * 64 * half / 64**2, rel=1e-3)
    total = sum(layer.full_mask((64, 64)) for layer in collage.layers)
    background = reader.masks.background_mask(collage.layers, (64, 64))
    np.testing.assert_allclose(total + background, 1.0, atol=1e-5)
    assert all(
        layer.visible.min() >= 0.0 and layer.visible.max() <= 1.0 for layer in collage.layers
    )


def test_tiny_layer_is_rendered_but_not_steered(tmp_path: Path) -> None:
    path = build_psd(
        tmp_path / "tiny.psd",
        [Pixels("grass", (0, 0, 64, 64), GREEN), Pixels("a bee", (30, 30, 33, 33), RED)],
    )
    collage = read_collage(path)
    bee = collage.layers[1]
    assert bee.caption == "a bee" and not bee.steered
    assert any("'a bee'" in w and "not steered" in w for w in collage.warnings)
    steered = read_collage(path, Settings(min_area=0.001)).layers[1]
    assert steered.steered


def test_unicode_and_emoji_names_survive(tmp_path: Path, fixtures_dir: Path) -> None:
    path = build_psd(
        tmp_path / "u.psd",
        [
            Pixels("草原 🌿", (0, 0, 64, 64), GREEN),
            Pixels("Кот в шляпе [noise=0.2]", (8, 8, 40, 40), RED),
        ],
    )
    collage = read_collage(path)
    assert [layer.caption for layer in collage.layers] == ["草原 🌿", "Кот в шляпе"]
    assert collage.layers[1].noise == 0.2
    emoji = read_collage(fixtures_dir / "layer-name-emoji.psd")
    assert [layer.caption for layer in emoji.layers] == ["👽"]


@pytest.mark.parametrize(
    "name",
    [
        "Layer 1",
        "Layer 12 copy",
        "Layer 1 copy 3",
        "Background",
        "Background copy",
        "Group 2",
        "Shape 3",
        "Ellipse 1",
        "Rectangle 2",
        "Rounded Rectangle 3 copy",
        "Color Fill 1",
        "Ebene 1 Kopie",
        "Hintergrund",
        "Calque 2 copie",
        "Arrière-plan",
        "Capa 1",
        "Livello 4",
        "Sfondo",
        "レイヤー 1",
        "レイヤー 1 のコピー",
        "背景",
        "Слой 2",
        "Фон",
        "Фигура 4 копия",
        "图层 3",
        "레이어 1",
    ],
)
def test_photoshop_default_names_have_no_caption(name: str) -> None:
    assert is_default_name(name)


@pytest.mark.parametrize(
    "name", ["a red car", "Layer cake", "Background singer", "Star", "Group of friends", "Фон 2x"]
)
def test_meaningful_names_keep_their_caption(name: str) -> None:
    assert not is_default_name(name)


# ---------------------------------------------------------------------------
# Groups, split, skip, hidden, clipping, adjustments, artboards
# ---------------------------------------------------------------------------


def _scene(split: str = "", extra: list | None = None) -> list:
    return [
        Pixels("a lawn", (0, 0, 64, 64), GREEN),
        Group(
            f"a picnic{split}",
            [Pixels("a basket", (4, 4, 20, 20), RED), Pixels("an apple", (30, 30, 40, 40), BLUE)],
        ),
        *(extra or []),
    ]


def test_group_is_one_layer_captioned_with_its_name(tmp_path: Path) -> None:
    collage = read_collage(build_psd(tmp_path / "g.psd", _scene()))
    assert names(collage) == ["a lawn", "a picnic"]
    picnic = collage.layers[1]
    assert picnic.caption == "a picnic" and picnic.sources == ["a basket", "an apple"]
    assert picnic.box == (4, 4, 40, 40)
    alpha = full_alpha(picnic, (64, 64))
    assert alpha[10, 10] == 1.0 and alpha[35, 35] == 1.0 and alpha[25, 25] == 0.0


def test_split_group_makes_each_child_a_layer_and_passes_its_tags_down(tmp_path: Path) -> None:
    collage = read_collage(build_psd(tmp_path / "s.psd", _scene(" [split, noise=0.2]")))
    assert names(collage) == ["a lawn", "a basket", "an apple"]
    assert [layer.noise for layer in collage.layers] == [0.6, 0.2, 0.2]
    assert not any(layer.options.split for layer in collage.layers)


def test_skip_and_hidden_layers_are_out_of_collage_and_composite(tmp_path: Path) -> None:
    extra = [
        Pixels("a ufo [skip]", (0, 0, 64, 10), BLUE),
        Pixels("a ghost", (0, 50, 64, 64), RED, visible=False),
        Group("hidden group", [Pixels("a cloud", (40, 0, 64, 20), RED)], visible=False),
    ]
    collage = read_collage(build_psd(tmp_path / "h.psd", _scene(extra=extra)))
    assert names(collage) == ["a lawn", "a picnic"]
    assert tuple(collage.composite[5, 2]) == GREEN  # the ufo is not painted
    assert tuple(collage.composite[60, 30]) == GREEN  # nor the ghost
    assert tuple(collage.composite[10, 50]) == GREEN  # nor the cloud
    assert tuple(collage.composite[10, 10]) == RED


def test_skip_inside_a_group_removes_that_child_from_the_group(tmp_path: Path) -> None:
    layers = [
        Pixels("a lawn", (0, 0, 64, 64), GREEN),
        Group(
            "a picnic",
            [Pixels("a basket", (4, 4, 20, 20), RED), Pixels("x [skip]", (30, 30, 40, 40), BLUE)],
        ),
    ]
    collage = read_collage(build_psd(tmp_path / "gs.psd", layers))
    picnic = collage.layers[1]
    assert picnic.sources == ["a basket"] and picnic.box == (4, 4, 20, 20)
    assert tuple(collage.composite[35, 35]) == GREEN


def test_clipping_layer_belongs_to_its_base(tmp_path: Path) -> None:
    layers = [
        Pixels("a wall", (0, 0, 64, 64), GREEN),
        Pixels("a poster", (10, 10, 30, 30), RED),
        Pixels("stripes", (0, 0, 20, 64), BLUE, clipping=True),
    ]
    collage = read_collage(build_psd(tmp_path / "c.psd", layers))
    assert names(collage) == ["a wall", "a poster"]
    poster = collage.layers[1]
    assert poster.sources == ["a poster", "stripes"] and poster.box == (10, 10, 30, 30)
    assert tuple(poster.pixels[5, 5, :3]) == BLUE  # clipped paint inside the poster
    assert tuple(poster.pixels[5, 15, :3]) == RED
    assert tuple(collage.composite[50, 5]) == GREEN  # no stripes outside the poster


def test_photoshop_clipping_and_nested_split_from_fixture(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    whole = read_collage(fixtures_dir / "clipping-mask.psd")
    assert names(whole) == ["Background", "Group 2"]
    assert whole.layers[1].box[1] == 0  # cropped to the canvas: the group starts above it
    path = edit_copy(
        fixtures_dir / "clipping-mask.psd",
        tmp_path / "split.psd",
        rename={"Group 2": "shapes [split]"},
    )
    split = read_collage(path)
    # the nested "Group 1" stays one layer; "Shape 2" clips to "Shape 1" and is part of it
    assert names(split) == ["Background", "Group 1", "Shape 1"]
    assert split.layers[2].sources == ["Shape 1", "Shape 2"]
    np.testing.assert_array_equal(split.composite, whole.composite)


def test_adjustment_layers_change_the_composite_but_are_not_layers(fixtures_dir: Path) -> None:
    collage = read_collage(fixtures_dir / "fill_adjustments.psd")
    assert names(collage) == ["Background", "Rectangle 1", "Rectangle 2", "Rectangle 3"]
    plain = np.full((256, 256, 3), 255.0)
    for layer in collage.layers:  # the layers stacked without any adjustment
        left, top, right, bottom = layer.box
        a = layer.alpha[..., None]
        plain[top:bottom, left:right] = plain[top:bottom, left:right] * (1 - a) + (
            layer.pixels[..., :3] * a
        )
    assert np.abs(collage.composite - plain).mean() > 10  # adjustments did act


def test_artboard_behaves_like_a_group(fixtures_dir: Path) -> None:
    collage = read_collage(fixtures_dir / "artboard.psd")
    assert names(collage) == ["Artboard 1"]
    assert collage.layers[0].sources == ["Layer 0", "First Artboard", "border"]


def test_empty_layers_and_groups_are_dropped_with_a_warning(fixtures_dir: Path) -> None:
    collage = read_collage(fixtures_dir / "empty-group.psd")
    assert names(collage) == ["Background"]
    assert any("'group' is empty" in w for w in collage.warnings)


# ---------------------------------------------------------------------------
# Locks and sidecar options
# ---------------------------------------------------------------------------


def test_lock_all_and_lock_tag_pin_the_layer(tmp_path: Path) -> None:
    layers = [
        Pixels("a lawn", (0, 0, 64, 64), GREEN),
        Pixels("a logo", (0, 0, 10, 10), RED, lock_all=True),
        Pixels("a sign [lock]", (20, 20, 30, 30), BLUE),
        Group("kids", [Pixels("a kid", (40, 40, 50, 50), RED)], lock_all=True),
    ]
    collage = read_collage(build_psd(tmp_path / "l.psd", layers))
    noise = {layer.name: layer.noise for layer in collage.layers}
    assert noise == {"a lawn": 0.6, "a logo": 0.0, "a sign [lock]": 0.0, "kids": 0.0}
    assert [layer.locked for layer in collage.layers] == [False, True, True, True]


def test_sidecar_layer_tables_override_tags_by_name_or_caption(tmp_path: Path) -> None:
    layers = [
        Pixels("a lawn", (0, 0, 64, 64), GREEN),
        Pixels("a car [noise=0.4]", (10, 10, 30, 30), RED),
        Pixels("a logo", (40, 40, 50, 50), BLUE, lock_all=True),
        Pixels("a ufo", (0, 0, 5, 5), BLUE),
    ]
    path = build_psd(tmp_path / "side.psd", layers)
    settings = Settings(noise=0.5).updated(
        {
            "layers": {
                "a car": {"noise": 0.9},  # by caption
                "a logo": {"lock": False, "noise": 0.1},  # the sidecar can unlock
                "a ufo": {"skip": True},
            }
        }
    )
    collage = read_collage(path, settings)
    assert {layer.caption: layer.noise for layer in collage.layers} == {
        "a lawn": 0.5,
        "a car": 0.9,
        "a logo": 0.1,
    }


def test_sidecar_key_matching_no_layer_is_an_error(tmp_path: Path) -> None:
    path = build_psd(tmp_path / "side.psd", [Pixels("a lawn", (0, 0, 64, 64), GREEN)])
    settings = Settings(layers={"a lawm": LayerOptions(noise=0.2)})
    with pytest.raises(SettingsError, match=r"side\.psd.*a lawm.*matches no layer"):
        read_collage(path, settings)


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def _text_fixture(fixtures_dir: Path, tmp_path: Path, new_name: str, **kwargs) -> Path:
    return edit_copy(
        fixtures_dir / "text.psd",
        tmp_path / "text.psd",
        rename={"Line 1 Line 2 Line 3 and text": new_name},
        **kwargs,
    )


def test_prompt_text_layer_even_hidden_is_the_prompt_not_a_layer(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    path = _text_fixture(fixtures_dir, tmp_path, "Prompt", hide=["Line 1 Line 2 Line 3 and text"])
    collage = read_collage(path, Settings(prompt_suffix="watercolor"))
    assert collage.prompt == "Line 1 Line 2 Line 3 and text, watercolor"
    assert names(collage) == ["Background"]


def test_visible_prompt_text_is_left_out_of_the_composite(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    original = read_collage(_text_fixture(fixtures_dir, tmp_path, "the text [lock]"))
    text = original.layers[1]  # tagged in: a collage layer, in the picture
    left, top, right, bottom = text.box
    collage = read_collage(_text_fixture(fixtures_dir, tmp_path, "prompt"))
    background = collage.layers[0]
    assert names(collage) == ["Background"]
    np.testing.assert_array_equal(
        collage.composite[top:bottom, left:right],
        background.pixels[top:bottom, left:right, :3],
    )
    assert not np.array_equal(
        original.composite[top:bottom, left:right], collage.composite[top:bottom, left:right]
    )


def test_negative_text_layer(fixtures_dir: Path, tmp_path: Path) -> None:
    path = _text_fixture(fixtures_dir, tmp_path, "NEGATIVE")
    assert read_collage(path).negative_prompt == "Line 1 Line 2 Line 3 and text"
    assert read_collage(path, Settings(negative="blurry")).negative_prompt == "blurry"


def test_prompt_precedence_settings_then_text_then_file_info_then_captions(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    text = _text_fixture(fixtures_dir, tmp_path, "prompt", description="from file info")
    assert read_collage(text).prompt == "Line 1 Line 2 Line 3 and text"
    assert read_collage(text, Settings(prompt="from the sidecar")).prompt == "from the sidecar"

    layers = [Pixels("a lawn", (0, 0, 64, 64), GREEN), Pixels("a red car", (5, 5, 30, 30), RED)]
    described = build_psd(tmp_path / "d.psd", layers, description="a car on grass\rat noon")
    collage = read_collage(described)
    assert collage.prompt == "a car on grass at noon"
    assert not any("no prompt" in w for w in collage.warnings)

    bare = build_psd(tmp_path / "bare.psd", layers)
    collage = read_collage(bare)
    assert collage.prompt == "a lawn, a red car"
    assert any("using the layer captions" in w for w in collage.warnings)


# ---------------------------------------------------------------------------
# Editing: [harmonized] groups
# ---------------------------------------------------------------------------


def _edited(tmp_path: Path, *, group_visible: bool = True) -> Path:
    layers = [
        Pixels("a lawn", (0, 0, 64, 64), GREEN),
        Pixels("a red car [redo, noise=0.7]", (10, 10, 30, 30), RED),
        Group(
            f"{HARMONIZED_PREFIX} 2024-05-01 10:00 old",
            [Pixels("seed 1", (0, 0, 64, 64), (1, 2, 3), visible=False)],
        ),
        Group(
            f"{HARMONIZED_PREFIX} 2024-05-02 11:00 tiny",
            [
                Pixels("seed 7", (0, 0, 64, 64), (200, 200, 0)),
                Pixels("seed 8", (0, 0, 64, 64), (0, 200, 200), visible=False),
            ],
            visible=group_visible,
        ),
    ]
    return build_psd(tmp_path / "edit.psd", layers)


def test_visible_harmonized_variant_is_the_base_and_never_an_input(tmp_path: Path) -> None:
    collage = read_collage(_edited(tmp_path))
    assert names(collage) == ["a lawn", "a red car [redo, noise=0.7]"]
    assert collage.base is not None and collage.base.layer == "seed 7"
    assert collage.base.group.endswith("tiny")
    assert collage.base.pixels.shape == (64, 64, 3)
    assert tuple(collage.base.pixels[0, 0]) == (200, 200, 0)
    assert tuple(collage.composite[0, 0]) == GREEN  # the variant is not in the composite
    assert collage.editing


def test_base_is_found_by_identity_when_variant_names_repeat(tmp_path: Path) -> None:
    """Two variants named "seed 7": the writer keeps the visible one the reader chose."""
    group = Group(
        f"{HARMONIZED_PREFIX} 2024-05-02 11:00 tiny",
        [
            Pixels("seed 7", (0, 0, 64, 64), (200, 200, 0)),  # visible, lower
            Pixels("seed 7", (0, 0, 64, 64), (0, 0, 250), visible=False),  # hidden, on top
        ],
    )
    layers = [Pixels("a lawn", (0, 0, 64, 64), GREEN), Pixels("a car [redo]", (8, 8, 24, 24), RED)]
    path = build_psd(tmp_path / "twins.psd", [*layers, group])
    collage = read_collage(path)
    assert collage.base is not None and tuple(collage.base.pixels[0, 0]) == (200, 200, 0)
    out = write_variants(
        path,
        tmp_path / "out.psd",
        [np.zeros((64, 64, 3), np.float32)],
        ["seed 1"],
        "new",
        pin=np.ones((64, 64), np.float32),
        pin_base=collage.base.record_index,
    )
    assert tuple(PSDImage.open(out)[-1][0].numpy()[0, 0, :3].round(3)) == (0.784, 0.784, 0.0)


@pytest.mark.parametrize("name", ["group.psd", "clipping-mask.psd", "layer_comps.psb", "blend-and-clipping.psd", "16bit5x5.psd"])  # fmt: skip
def test_record_index_names_the_layers_record(fixtures_dir: Path, name: str) -> None:
    psd = PSDImage.open(fixtures_dir / name)
    with open(fixtures_dir / name, "rb") as fh:
        records = layer_records(PSD.read(fh)).layer_records  # as the writer reads them
    for layer in psd.descendants():
        record = records[reader.record_index(psd, layer)]
        assert record.tagged_blocks.get_data(Tag.UNICODE_LAYER_NAME, record.name) == layer.name


def test_hidden_harmonized_group_means_no_base(tmp_path: Path) -> None:
    collage = read_collage(_edited(tmp_path, group_visible=False))
    assert collage.base is None and not collage.editing
    assert any("[redo]" in w for w in collage.warnings)


# ---------------------------------------------------------------------------
# Colour modes, depths, PSB
# ---------------------------------------------------------------------------


def _photoshop_merged_srgb(path: Path) -> np.ndarray:
    """psd-tools + PIL's own ICC conversion of Photoshop's merged image, over white."""
    image = PSDImage.open(path).composite().convert("RGBA")
    rgba = np.asarray(image, np.float32)
    a = rgba[..., 3:] / 255.0
    return rgba[..., :3] * a + 255.0 * (1 - a)


@pytest.mark.parametrize(
    ("name", "mode", "depth"),
    [
        ("adjustments/curves_cmyk.psd", "CMYK", 8),
        ("adjustments/posterize_16bits_cmyk.psd", "CMYK", 16),
        ("gray1.psd", "GRAYSCALE", 8),
        ("16bit5x5.psd", "RGB", 16),
        ("adjustments/posterize_16bits_rgb.psd", "RGB", 16),
    ],
)
def test_colour_modes_convert_to_plausible_srgb(
    fixtures_dir: Path, name: str, mode: str, depth: int
) -> None:
    collage = read_collage(fixtures_dir / name)
    assert (collage.document.color_mode, collage.document.depth) == (mode, depth)
    reference = _photoshop_merged_srgb(fixtures_dir / name)
    assert np.abs(collage.composite.astype(np.float32) - reference).mean() < 4.0
    if mode == "GRAYSCALE":
        pixels = collage.layers[1].pixels
        assert np.array_equal(pixels[..., 0], pixels[..., 1])


def test_cmyk_layer_pixels_are_srgb_not_inverted_ink(fixtures_dir: Path) -> None:
    path = fixtures_dir / "adjustments/curves_cmyk.psd"
    orion = read_collage(path).layers[0]
    # psd-tools' own rendering of that layer, converted to sRGB by PIL with the ICC profile
    layer = PSDImage.open(path)[0]
    reference = np.asarray(layer.composite().convert("RGB"), np.float32)  # starts at layer.bbox
    x, y = orion.box[0] - layer.left, orion.box[1] - layer.top
    height, width = orion.pixels.shape[:2]
    ref = reference[y : y + height, x : x + width]
    assert np.abs(ref - orion.pixels[..., :3]).mean() < 3


def test_32_bit_document_is_clipped_into_range(fixtures_dir: Path) -> None:
    collage = read_collage(fixtures_dir / "pen-text.psd")
    assert collage.document.depth == 32
    assert collage.composite.shape == (300, 300, 3)
    assert collage.composite.max() == 255 and collage.composite.std() > 10


def test_psb_reads_like_psd(fixtures_dir: Path) -> None:
    collage = read_collage(fixtures_dir / "2layers.psb")
    assert collage.document.psb and len(collage.layers) == 2
    psd = read_collage(fixtures_dir / "layer_comps.psd")
    psb = read_collage(fixtures_dir / "layer_comps.psb")
    assert names(psd) == names(psb) and not psd.document.psb


# ---------------------------------------------------------------------------
# Compositing paths agree
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["background-red-opacity-80.psd", "layer-name-emoji.psd", "2layers.psb", "16bit5x5.psd"])  # fmt: skip
def test_plain_layer_shortcut_matches_psd_tools_composite(fixtures_dir: Path, name: str) -> None:
    psd = PSDImage.open(fixtures_dir / name)
    mode = SUPPORTED_MODES[read_header(fixtures_dir / name, None).mode]
    icc = psd.image_resources.get_data(Resource.ICC_PROFILE) or None
    r = Compositor(psd, mode, icc, excluded=set())
    checked = 0
    for layer in psd:
        if not r.is_plain(layer):
            continue
        box = intersect(layer.bbox, (0, 0, psd.width, psd.height))
        fast = r.render_plain(layer, box).astype(int)
        slow = r.render(layer, box, opaque=False).astype(int)
        assert np.abs(fast[..., 3] - slow[..., 3]).max() <= 1
        seen = slow[..., 3] > 0  # colour under full transparency is meaningless
        assert np.abs(fast[seen] - slow[seen]).max() <= 1
        checked += 1
    assert checked


@pytest.mark.parametrize("name", ["group.psd", "mask.psd", "text.psd", "semi-transparent-layers.psd", "passthrough_blendmodes2.psd"])  # fmt: skip
def test_stored_merged_image_and_recomposite_agree(
    fixtures_dir: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = read_collage(fixtures_dir / name).composite.astype(int)
    monkeypatch.setattr(Compositor, "stored_composite", lambda self: None)
    rendered = read_collage(fixtures_dir / name).composite.astype(int)
    assert np.abs(stored - rendered).mean() < 0.5


def test_large_viewports_are_composited_in_bands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layers = [
        Pixels("a lawn", (0, 0, 96, 64), GREEN),
        Pixels("a car [skip]", (0, 0, 10, 10), RED),  # forces a recomposite
        Pixels("a sun", (60, 0, 90, 30), (250, 220, 0, 200)),
    ]
    path = build_psd(tmp_path / "bands.psd", layers, size=(96, 64))
    whole = read_collage(path)
    monkeypatch.setattr(composite, "BAND_PIXELS", 96 * 7)  # 7-row bands
    banded = read_collage(path)
    np.testing.assert_array_equal(whole.composite, banded.composite)
    for a, b in zip(whole.layers, banded.layers, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)


# ---------------------------------------------------------------------------
# Bad input: one readable CollageError, never a traceback
# ---------------------------------------------------------------------------


def test_not_a_psd_says_what_it_is(tmp_path: Path) -> None:
    png = tmp_path / "photo.psd"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(CollageError, match=r"photo\.psd: is not a Photoshop file.*PNG image"):
        read_collage(png)
    jpeg = tmp_path / "photo2.psd"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    with pytest.raises(CollageError, match="JPEG"):
        check_header(jpeg)
    empty = tmp_path / "empty.psd"
    empty.write_bytes(b"")
    with pytest.raises(CollageError, match="is empty"):
        read_collage(empty)
    with pytest.raises(CollageError, match="file not found"):
        read_collage(tmp_path / "missing.psd")


@pytest.mark.parametrize(("name", "fmt", "what"), [("pic.png", "PNG", "a PNG image"), ("scan.tif", "TIFF", "a TIFF image"), ("photo.jpeg", "JPEG", "a JPEG image")])  # fmt: skip
def test_a_real_image_is_called_what_it_is_not_a_renamed_one(
    tmp_path: Path, name: str, fmt: str, what: str
) -> None:
    from PIL import Image

    path = tmp_path / name
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format=fmt)
    with pytest.raises(CollageError) as caught:
        read_collage(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: is {what}, not a Photoshop file"), message
    assert "renamed" not in message and "Save As" in message
    renamed = tmp_path / "poster.psb"
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(CollageError, match=rf"looks like {what} renamed to \.psb"):
        check_header(renamed)


def test_truncated_file_is_incomplete_for_header_check_and_reader(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    data = (fixtures_dir / "layer_params.psd").read_bytes()
    check_header(fixtures_dir / "layer_params.psd")  # the complete file passes
    for cut in (20, 2_000, len(data) // 2, len(data) - 10):
        part = tmp_path / f"part{cut}.psd"
        part.write_bytes(data[:cut])
        with pytest.raises(CollageError, match="incomplete") as info:
            check_header(part)
        assert "\n" not in str(info.value) and f"part{cut}.psd" in str(info.value)
        with pytest.raises(CollageError, match="incomplete"):
            read_collage(part)


def test_corrupt_layer_data_becomes_a_collage_error(fixtures_dir: Path, tmp_path: Path) -> None:
    data = bytearray((fixtures_dir / "group.psd").read_bytes())
    start = 26 + 4 + int.from_bytes(data[26:30], "big")
    start += 4 + int.from_bytes(data[start : start + 4], "big")  # the layer section
    data[start + 4 : start + 4 + 400] = b"\xff" * 400  # garbage layer records
    bad = tmp_path / "bad.psd"
    bad.write_bytes(bytes(data))
    with pytest.raises(CollageError, match=r"bad\.psd: cannot be read") as info:
        read_collage(bad)
    assert not isinstance(info.value, TagError)


@pytest.mark.parametrize(
    ("name", "mode"),
    [("colormodes/4x4_8bit_lab.psd", "Lab"), ("colormodes/4x4_8bit_index_color.psd", "Indexed")],
)
def test_unsupported_colour_modes_name_the_photoshop_menu(
    fixtures_dir: Path, name: str, mode: str
) -> None:
    with pytest.raises(UnsupportedDocument, match=rf"{mode}.*Image > Mode > RGB Color"):
        read_collage(fixtures_dir / name)


def test_huge_canvas_is_refused_before_decoding(
    fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args, **kwargs):
        raise AssertionError("psd-tools must not open a file over max_pixels")

    monkeypatch.setattr(reader.PSDImage, "open", never)
    with pytest.raises(UnsupportedDocument, match=r"1000 x 867.*over the limit") as info:
        read_collage(fixtures_dir / "mask-index.psd", Settings(max_pixels=500_000))
    assert "mask-index.psd" in str(info.value)


@pytest.mark.parametrize("name", ["0layers.psb", "cmyk-alpha-spot.psd"])
def test_documents_without_layers_are_refused(fixtures_dir: Path, name: str) -> None:
    with pytest.raises(UnsupportedDocument, match="has no layers"):
        read_collage(fixtures_dir / name)


@pytest.mark.parametrize(
    ("layer_name", "message"),
    [
        ("a car [nosie=0.3]", r"'a car \[nosie=0.3\]'.*unknown tag 'nosie'"),
        ("a car [noise=1.5]", r"'a car \[noise=1.5\]'.*out of range"),
        ("a car [noise=lots]", r"not a number"),
    ],
)
def test_bad_tags_name_file_layer_and_tag(tmp_path: Path, layer_name: str, message: str) -> None:
    path = build_psd(tmp_path / "tags.psd", [Pixels(layer_name, (0, 0, 8, 8), RED)])
    with pytest.raises(TagError, match=message) as info:
        read_collage(path)
    assert str(info.value).startswith(str(path))


def test_psd_tools_log_output_is_captured_not_printed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), quiet_psd_tools() as diagnostics:
        logging.getLogger("psd_tools.composite").warning("Unsupported blend mode %s", "x")
        logging.getLogger("psd_tools.composite").warning("Unsupported blend mode %s", "x")
    assert diagnostics.messages == ["Unsupported blend mode x"]
    assert not [r for r in caplog.records if r.name.startswith("psd_tools")]


def test_read_only_fixture_copy_is_fine(fixtures_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ro.psd"
    shutil.copy(fixtures_dir / "group.psd", copy)
    copy.chmod(0o444)
    assert len(read_collage(copy).layers) == 2


# ---------------------------------------------------------------------------
# The committed sample
# ---------------------------------------------------------------------------

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "picnic.psd"


def test_sample_picnic_reads_as_documented() -> None:
    assert SAMPLE.stat().st_size < 3_000_000
    collage = read_collage(SAMPLE)
    assert collage.document.size == (768, 512)
    assert collage.prompt.startswith("a tabby cat and a cup of espresso")  # File Info description
    captions = [layer.caption for layer in collage.layers]
    assert captions == [
        "sunny park lawn under a blue sky",
        "a rocket launching in the distance",
        "red and white checkered picnic blanket",
        "a tabby cat",
        "a cup of espresso on a saucer",
    ]
    noise = [layer.noise for layer in collage.layers]
    assert noise == [0.6, 0.6, 0.0, 0.3, 0.6]
    psd = PSDImage.open(SAMPLE)
    for layer, cut_out in zip(psd, collage.layers, strict=True):
        assert not layer.has_mask()  # transparency is real alpha, not a layer mask
        if layer.name != "sunny park lawn under a blue sky":
            assert cut_out.pixels[0, 0, 3] < 128 or cut_out.pixels[-1, -1, 3] < 128
    assert all(layer.steered for layer in collage.layers)


@pytest.mark.skipif(not readers.imagemagick(), reason=readers.IMAGEMAGICK_MISSING)
def test_sample_layers_have_alpha_for_imagemagick_too() -> None:
    out = subprocess.run(
        ["identify", "-format", "%[channels] %l\n", str(SAMPLE)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    layers = [line.split(" ", 1) for line in out[1:]]  # [0] is the merged image
    assert [name for _, name in layers][3] == "a tabby cat [noise=0.3]"
    assert all(channels == "srgba" for channels, _ in layers)
    corner = subprocess.run(
        ["identify", "-format", "%[fx:p{0,0}.a] %[fx:p{120,97}.a]", f"{SAMPLE}[4]"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [float(v) for v in corner] == [0.0, 1.0]  # the cat's corner is transparent


def test_document_with_nothing_visible_is_refused(tmp_path: Path) -> None:
    layers = [
        Pixels("a lawn", (0, 0, 64, 64), GREEN, visible=False),
        Pixels("a car [skip]", (0, 0, 8, 8), RED),
    ]
    with pytest.raises(UnsupportedDocument, match="no visible layers"):
        read_collage(build_psd(tmp_path / "none.psd", layers))

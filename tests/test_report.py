"""``psd-collage inspect``: the JSON object, the table and the contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psd_collage import report
from psd_collage.psd.reader import read_collage
from psd_collage.settings import Settings
from tests.psd_builders import Pixels, build_psd

GREEN, RED, BLUE = (20, 200, 20), (220, 20, 20), (20, 20, 220)


@pytest.fixture
def collage(tmp_path: Path):
    path = build_psd(
        tmp_path / "scene.psd",
        [
            Pixels("a lawn", (0, 0, 128, 96), GREEN),
            Pixels("a red car [lock]", (8, 40, 56, 88), RED),
            Pixels("猫と犬 🐱 [noise=0.9]", (72, 8, 120, 56), BLUE),
            Pixels("Layer 4", (0, 0, 2, 2), RED),
        ],
        size=(128, 96),
        description="a car and pets on a lawn",
    )
    return read_collage(path, Settings(noise=0.5))


def test_inspect_data_has_the_documented_shape(collage) -> None:
    data = report.inspect_data(collage)
    assert set(data) == {"document", "layers", "renders", "warnings"}
    doc = data["document"]
    assert {"width", "height", "color_mode", "depth", "prompt", "negative_prompt"} <= set(doc)
    assert (doc["width"], doc["height"], doc["color_mode"], doc["depth"]) == (128, 96, "RGB", 8)
    assert doc["prompt"] == "a car and pets on a lawn" and doc["base"] is None
    names = [layer["name"] for layer in data["layers"]]
    assert names == ["a lawn", "a red car [lock]", "猫と犬 🐱 [noise=0.9]", "Layer 4"]
    for layer in data["layers"]:
        assert {"name", "caption", "noise", "visible_area", "locked", "sources"} <= set(layer)
        assert {"noise_source", "redo", "ti"} <= set(layer)
    car, pets = data["layers"][1], data["layers"][2]
    assert car["locked"] is True and car["noise"] == 0.0 and car["options"] == {"lock": True}
    assert pets["caption"] == "猫と犬 🐱" and pets["noise"] == 0.9 and pets["locked"] is False
    assert pets["box"] == [72, 8, 120, 56]
    assert data["layers"][0]["noise"] == 0.5
    assert data["warnings"] == collage.warnings and data["warnings"]
    text = json.dumps(data, ensure_ascii=False)  # serialisable as is
    assert json.loads(text) == data


def test_table_is_aligned_even_with_wide_characters(collage) -> None:
    table = report.format_table(collage)
    lines = table.splitlines()
    assert lines[0] == "scene.psd: 128 x 96 px, RGB 8-bit PSD"
    assert "prompt:   a car and pets on a lawn" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    rows = lines[header : header + 5]
    # the "noise" column ends at the same terminal column on every row
    ends = {report._width(row[: row.index(cell) + len(cell)]) for row, cell in zip(rows, ["noise", "0.50", "0.00", "0.90", "0.50"], strict=True)}  # fmt: skip
    assert len(ends) == 1
    assert "猫と犬 🐱" in rows[3] and "yes" in rows[2]  # the car is locked
    assert "warnings (" in table and "'Layer 4'" in table


def test_sheet_shows_collage_masks_and_noise_map(collage, tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    assert report.write_sheet(collage, out) == out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    scale = min(1.0, report.TILE / 128)  # tiles are scaled down to TILE, never up
    tile_w, tile_h = round(128 * scale), round(96 * scale)
    cell_w, cell_h = tile_w + report._GAP, tile_h + report._LABEL_HEIGHT + report._GAP
    tiles = len(collage.layers) + 2  # collage, one per layer, noise map
    columns = min(report._COLUMNS, tiles)
    assert sheet.shape[1] == columns * cell_w + report._GAP
    assert sheet.shape[0] == 24 + -(-tiles // columns) * cell_h + report._GAP

    def tile(index: int) -> np.ndarray:
        x = report._GAP + (index % columns) * cell_w
        y = 24 + (index // columns) * cell_h
        return sheet[y : y + tile_h, x : x + tile_w]

    def at(image: np.ndarray, x: int, y: int) -> np.ndarray:
        return image[round(y * scale), round(x * scale)]

    first = tile(0)
    assert np.abs(at(first, 30, 60) - RED).max() <= 2  # the flattened collage
    car_mask = tile(2)
    assert at(car_mask, 30, 60).min() > 240 and at(car_mask, 100, 80).max() < 15
    lawn_mask = tile(1)
    assert at(lawn_mask, 30, 60).max() < 15 and at(lawn_mask, 100, 80).min() > 240
    heat = tile(tiles - 1)
    # locked car (noise 0) is dark purple; lawn (0.5) is green-blue; pets (0.9) near yellow
    kept, lawn, pets = at(heat, 30, 64), at(heat, 60, 20), at(heat, 96, 30)
    assert kept.sum() < lawn.sum() < pets.sum()
    assert np.abs(kept - report._RAMP[0]).max() < 30


def test_heat_ramp_runs_from_kept_to_repainted() -> None:
    ramp = report._heat(np.array([[0.0, 0.5, 1.0]], np.float32))[0]
    np.testing.assert_array_equal(ramp[0], report._RAMP[0])
    np.testing.assert_array_equal(ramp[2], report._RAMP[-1])
    assert ramp[1].tolist() == report._RAMP[2].tolist()


def test_sheet_of_the_sample_is_scaled_down(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parents[1] / "samples" / "picnic.psd"
    collage = read_collage(sample)
    out = report.write_sheet(collage, tmp_path / "picnic.png")
    with Image.open(out) as image:
        width, height = image.size
    tile_w, tile_h = 256, round(512 * 256 / 768)
    tiles = len(collage.layers) + 2
    assert width == 4 * (tile_w + report._GAP) + report._GAP
    assert (
        height == 24 + -(-tiles // 4) * (tile_h + report._LABEL_HEIGHT + report._GAP) + report._GAP
    )


def _draws_distinctly(one: str, other: str) -> bool:
    """Tofu boxes would draw two different words alike; real glyphs don't."""
    from PIL import Image, ImageDraw

    from psd_collage.report import _font

    def draw(text: str) -> np.ndarray:
        image = Image.new("L", (80, 20))
        ImageDraw.Draw(image).text((2, 2), text, fill=255, font=_font(14, text))
        return np.asarray(image)

    return bool(draw(one).any()) and not np.array_equal(draw(one), draw(other))


@pytest.mark.parametrize(("one", "other"), [("Кот", "Дом"), ("猫", "犬"), ("ä ß", "ö ẞ")])
def test_sheet_labels_draw_non_latin_text_with_a_font_that_has_it(one: str, other: str) -> None:
    if report.font_covering(one + other) is None:
        pytest.skip(
            f"no font with glyphs for {one!r}: `pip install -e '.[dev]'` (matplotlib-fontja "
            "ships one; make test does it) or apt-get install fonts-droid-fallback"
        )
    assert _draws_distinctly(one, other)


@pytest.mark.parametrize(("one", "other"), [("Кот", "Дом"), ("猫", "犬")])
def test_sheet_labels_draw_cjk_and_cyrillic_without_any_system_font(
    one: str, other: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh machine: no system font at all; the fonts the dev extra installs draw them."""
    monkeypatch.setattr(report, "FONT_CANDIDATES", ())
    report._font_file.cache_clear()
    try:
        assert report.font_covering(one + other) in report.package_fonts()
        assert _draws_distinctly(one, other)
    finally:
        report._font_file.cache_clear()

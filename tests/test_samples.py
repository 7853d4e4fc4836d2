"""``samples/shapes.psd``: what its script makes, in the words the ``shapes`` model knows,
and a collage that model harmonizes (objects move toward the scene's sunset light)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from psd_tools import PSDImage

from psd_collage.psd.reader import read_collage
from psd_collage.render import Renderer
from psd_collage.settings import Settings
from psd_collage.shapes import metrics
from psd_collage.shapes.psd import read_variants
from psd_collage.shapes.world import VOCABULARY, draw

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "shapes.psd"


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_shapes_sample", ROOT / "samples" / "make_shapes_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layers(path: Path) -> list[tuple[str, np.ndarray]]:
    return [(layer.name, layer.numpy()) for layer in PSDImage.open(path)]


def test_the_shipped_sample_is_what_its_script_makes(tmp_path):
    rebuilt = _script().write_sample(tmp_path / "shapes.psd")
    shipped, fresh = _layers(SAMPLE), _layers(rebuilt)
    assert [name for name, _ in shipped] == [name for name, _ in fresh]
    for (name, a), (_, b) in zip(shipped, fresh, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert SAMPLE.stat().st_size < 200_000  # small enough to ship


def test_every_word_of_the_sample_is_one_the_shapes_model_knows():
    collage = read_collage(SAMPLE, Settings().updated({"model": "shapes"}))
    words = set(collage.prompt.replace(",", " ").split())
    for layer in collage.layers:
        words |= set(layer.caption.split())
    assert words <= set(VOCABULARY), words - set(VOCABULARY)
    assert [layer.caption for layer in collage.layers] == [
        "snow at sunset",
        "a blue square",
        "a green triangle",
        "a red circle",
    ]


def test_the_shapes_model_relights_the_samples_objects_toward_sunset(tmp_path):
    script = _script()
    renderer = Renderer(overrides={"model": "shapes", "variants": 2, "steps": 15, "seed": 1})
    result = renderer.render_file(SAMPLE, tmp_path / "shapes.harmonized.psd")
    truth = draw([script.SCENE]).images[0]
    pasted = draw([script.SCENE.lit(script.OBJECT_LIGHT)]).images[0]
    visible = draw([script.SCENE]).visible[0]
    variants = read_variants(result.output)
    for slot, shape in enumerate(script.SCENE.objects):
        region = metrics.core(visible[slot])
        moved = [
            metrics.harmonization(image[region], pasted[region], truth[region])
            for image in variants
        ]
        # Shipped weights, 15 steps: blue 0.86, green 0.64, red 0.12 on average.
        assert np.mean(moved) > 0.0, (shape.caption, moved)

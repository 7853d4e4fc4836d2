"""The shapes world: seeded scenes, the caption contract, ground truth, layered PSDs."""

from __future__ import annotations

import re

import numpy as np

from psd_collage.psd.reader import read_collage
from psd_collage.shapes import metrics
from psd_collage.shapes.psd import write_scene_psd
from psd_collage.shapes.world import (
    COLOURS,
    LIGHTS,
    apply_light,
    draw,
    random_scenes,
)

PROMPT = re.compile(
    r"^a (red|green|blue|yellow|white) (circle|square|triangle)"
    r"((, | and )a (red|green|blue|yellow|white) (circle|square|triangle))*"
    r" on (grass|sand|snow|water) (in daylight|at sunset|at night)$"
)


def test_world_is_seeded_and_captions_follow_the_contract():
    a, b = random_scenes(20, seed=5), random_scenes(20, seed=5)
    assert a == b and a != random_scenes(20, seed=6)
    assert np.array_equal(draw(a[:3]).images, draw(b[:3]).images)
    for scene in a:
        assert PROMPT.match(scene.prompt), scene.prompt
        assert 1 <= len(scene.objects) <= 3
        assert all(re.fullmatch(r"a \w+ \w+", o.caption) for o in scene.objects)


def test_ground_truth_masks_and_colours_match_the_picture():
    drawn = draw(random_scenes(12, seed=1))
    for i, scene in enumerate(drawn.scenes):
        for slot, shape in enumerate(scene.objects):
            region = metrics.core(drawn.visible[i, slot])
            if region.sum() < 20:
                continue
            median = np.median(drawn.images[i][region], axis=0)
            assert np.abs(median - drawn.lit[i, slot]).max() < 0.06
            assert metrics.region_colour(drawn.images[i], region) == shape.colour


def test_one_light_changes_every_surface_consistently():
    scene = random_scenes(1, seed=2)[0]
    day, sunset, night = (draw([scene.lit(light)]).images[0] for light in LIGHTS)
    assert night.mean() < 0.6 * day.mean()
    assert night[..., 2].mean() > night[..., 0].mean()  # bluer
    assert sunset[..., 0].mean() / sunset[..., 2].mean() > day[..., 0].mean() / day[..., 2].mean()
    for rgb in COLOURS.values():
        assert apply_light(rgb, "night").sum() < apply_light(rgb, "day").sum()


def test_scene_psd_has_the_backdrop_and_one_layer_per_caption(tmp_path):
    scene = random_scenes(1, seed=11, objects=(3, 3))[0]
    path = write_scene_psd(tmp_path / "s.psd", scene, object_tags="[noise=0.6]")
    collage = read_collage(path)
    assert collage.prompt == scene.prompt
    assert [layer.caption for layer in collage.layers][1:] == [o.caption for o in scene.objects]
    assert all(layer.noise == 0.6 for layer in collage.layers[1:])
    expected = np.clip(draw([scene]).images[0], 0, 1) * 255
    assert np.abs(collage.composite.astype(np.float32) - expected).max() <= 2

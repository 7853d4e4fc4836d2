"""Build ``samples/shapes.psd``: a collage the ``shapes`` model that ships with
psd-collage can render, offline, on any machine.

Run from the repository root::

    python samples/make_shapes_sample.py            # writes samples/shapes.psd

Three objects cut from a daylight scene (a blue square, a green triangle, a red circle)
pasted onto snow at sunset: every word of the prompt and of the layer names is in the
``shapes`` world's vocabulary (psd_collage/shapes/weights/README.md). The objects may
change a lot (``noise=0.6``), the backdrop a little (``noise=0.3``), as in ``make demo``;
the prompt is in File > File Info > Description.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from psd_collage.shapes.demo import BACKDROP_TAGS, OBJECT_TAGS
from psd_collage.shapes.psd import write_scene_psd
from psd_collage.shapes.world import Scene, Shape

OUTPUT = Path(__file__).resolve().parent / "shapes.psd"
#: Sunset snow; the objects come from a daylight scene (the colours to harmonize).
SCENE = Scene(
    backdrop="snow",
    light="sunset",
    horizon=0.5,
    objects=(
        Shape("square", "blue", 30.0, 88.0, 17.0),
        Shape("triangle", "green", 96.0, 82.0, 20.0),
        Shape("circle", "red", 62.0, 44.0, 16.0),
    ),
    texture_seed=3,
)
#: The light the pasted objects were cut from.
OBJECT_LIGHT = "day"


def write_sample(path: Path = OUTPUT) -> Path:
    """Write the sample collage (128 x 128 px, the model's native size)."""
    return write_scene_psd(
        path,
        SCENE,
        object_light=OBJECT_LIGHT,
        object_tags=OBJECT_TAGS,
        backdrop_tags=BACKDROP_TAGS,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write the PSD")
    print(write_sample(parser.parse_args().out))


if __name__ == "__main__":
    main()

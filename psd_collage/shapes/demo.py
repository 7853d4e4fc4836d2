"""``make demo``: a shapes collage (objects cut from a daylight scene pasted onto a night
scene) written as a PSD, ready for ``psd-collage render --model shapes``.

``python -m psd_collage.shapes.demo out/shapes.psd`` writes the collage;
``python -m psd_collage.shapes.demo --figure docs/shapes-demo.png out/shapes.psd
out/shapes.harmonized.psd`` puts the input, the rendered variants and the world's true
answer side by side (the README's picture).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..collage import to_u8
from ..preview import INPUT_LABEL, contact_sheet
from .psd import write_scene_psd
from .world import Scene, Shape, draw

#: The demo's layout: three objects on grass, the backdrop at night.
DEMO_SCENE = Scene(
    backdrop="grass",
    light="night",
    horizon=0.45,
    objects=(
        Shape("circle", "red", 36.0, 84.0, 20.0),
        Shape("square", "blue", 92.0, 90.0, 18.0),
        Shape("triangle", "yellow", 66.0, 46.0, 20.0),
    ),
    texture_seed=7,
)
#: How much each part may change: the pasted objects a lot, the night backdrop a little.
OBJECT_TAGS = "[noise=0.6]"
BACKDROP_TAGS = "[noise=0.3]"
#: The figure's last panel: the same objects drawn under the scene's own light.
TRUTH_LABEL = "truth"


def write_demo(path: str | Path) -> Path:
    """Write the demo collage: daylight objects on the night scene."""
    return write_scene_psd(
        path, DEMO_SCENE, object_light="day", object_tags=OBJECT_TAGS, backdrop_tags=BACKDROP_TAGS
    )


def side_by_side(
    source: Path, rendered: Path, out: Path, *, truth: np.ndarray | None = None, scale: int = 3
) -> Path:
    """The input's composite, every variant of ``rendered``'s newest output group, then
    ``truth`` if given; each enlarged ``scale`` times (nearest neighbour) and named
    underneath (input, seed N, truth)."""
    from psd_tools import PSDImage

    from ..psd.variants import read_named_variants

    composite = np.asarray(PSDImage.open(source).composite().convert("RGB"))
    named = [(INPUT_LABEL, composite), *read_named_variants(rendered)]
    if truth is not None:
        named.append((TRUTH_LABEL, to_u8(truth)))
    tiles = [np.kron(pixels, np.ones((scale, scale, 1), np.uint8)) for _, pixels in named]
    sheet = contact_sheet(tiles, [label for label, _ in named])
    return atomic_write(out, lambda fh: sheet.save(fh, format="PNG"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--figure"]:
        # Last, the world's answer: the same objects drawn under the scene's own light.
        truth = draw([DEMO_SCENE]).images[0]
        print(side_by_side(Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[2]), truth=truth))
    else:
        out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/shapes.psd")
        out.parent.mkdir(parents=True, exist_ok=True)
        print(write_demo(out))

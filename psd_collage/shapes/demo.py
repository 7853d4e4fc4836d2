"""``make demo``: a shapes collage (objects cut from a daylight scene pasted onto a night
scene) written as a PSD, ready for ``psd-collage render --model shapes``.

``python -m psd_collage.shapes.demo out/shapes.psd``
"""

from __future__ import annotations

import sys
from pathlib import Path

from .psd import write_scene_psd
from .world import Scene, Shape

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


def write_demo(path: str | Path) -> Path:
    """Write the demo collage: daylight objects on the night scene."""
    return write_scene_psd(
        path, DEMO_SCENE, object_light="day", object_tags=OBJECT_TAGS, backdrop_tags=BACKDROP_TAGS
    )


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/shapes.psd")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(write_demo(out))

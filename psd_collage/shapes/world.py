"""The ``shapes`` world: coloured shapes on grass, sand, snow or water, under one light.

A small synthetic world whose ground truth is known, so the ``shapes`` model can be
trained on it here and the engine's picture quality measured against it (fidelity,
harmonization, steering). Scenes are described by :class:`Scene` specs and drawn in
batches with vectorised numpy; every object comes back with its mask and its unlit
and lit colour.

The caption words are a contract (the model card lists them): object captions are
exactly ``a <colour> <shape>``; a scene prompt reads
``a red circle and a blue square on grass at night``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 128  #: the world's (and the model's) native canvas, in pixels

SHAPES = ("circle", "square", "triangle")
#: Object colours, unlit (daylight) sRGB in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.16, 0.70, 0.22),
    "blue": (0.14, 0.28, 0.88),
    "yellow": (0.95, 0.84, 0.15),
    "white": (0.95, 0.95, 0.93),
}
#: Backdrops: (ground colour, sky colour), unlit.
BACKDROPS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "grass": ((0.30, 0.55, 0.22), (0.55, 0.75, 0.95)),
    "sand": ((0.85, 0.74, 0.50), (0.60, 0.80, 0.97)),
    "snow": ((0.90, 0.92, 0.95), (0.66, 0.76, 0.88)),
    "water": ((0.12, 0.38, 0.62), (0.62, 0.80, 0.96)),
}
#: Lights: the phrase in prompts, and the per-channel gain and offset every surface gets.
LIGHTS: dict[str, tuple[str, tuple[float, float, float], tuple[float, float, float]]] = {
    "day": ("in daylight", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    "sunset": ("at sunset", (1.0, 0.70, 0.48), (0.10, 0.04, 0.0)),
    "night": ("at night", (0.24, 0.30, 0.52), (0.02, 0.03, 0.08)),
}

#: Every word the world's prompts use: the contract the model card lists.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "and", "on", *COLOURS, *SHAPES, *BACKDROPS]
        + " ".join(phrase for phrase, _, _ in LIGHTS.values()).split()
    )
)


def apply_light(rgb: np.ndarray, light: str) -> np.ndarray:
    """The colour a surface of unlit colour ``rgb`` (..., 3) shows under ``light``."""
    _, gain, offset = LIGHTS[light]
    return np.clip(np.asarray(rgb, np.float32) * np.float32(gain) + np.float32(offset), 0, 1)


@dataclass(frozen=True)
class Shape:
    """One object: kind, colour name, centre and half-size in pixels of a ``SIZE`` canvas."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene spec: backdrop, horizon row (fraction of the height), objects back to front."""

    backdrop: str
    light: str
    horizon: float
    objects: tuple[Shape, ...]
    texture_seed: int = 0

    @property
    def prompt(self) -> str:
        return scene_prompt([o.caption for o in self.objects], self.backdrop, self.light)

    def lit(self, light: str) -> Scene:
        """The same layout under another light."""
        return replace(self, light=light)


def scene_prompt(captions: list[str], backdrop: str, light: str) -> str:
    """``a red circle, a blue square and a white triangle on snow at night``."""
    things = ", ".join(captions[:-1]) + " and " + captions[-1] if len(captions) > 1 else captions[0]
    return f"{things} on {backdrop} {LIGHTS[light][0]}"


@dataclass
class Drawn:
    """A batch of drawn scenes with their ground truth.

    ``images``: (n, h, w, 3) float32 lit sRGB; ``backdrops``: (n, h, w, 3) the backdrop
    alone; ``alphas``: (n, k, h, w) each object's own anti-aliased coverage (k = most
    objects in the batch; unused slots are zero); ``visible``: the same after
    occlusion by the objects in front; ``unlit``: (n, k, 3) object colours, ``lit``:
    their mean over the object under the scene's light (objects are shaded slightly).
    """

    scenes: list[Scene]
    images: np.ndarray
    backdrops: np.ndarray
    alphas: np.ndarray
    visible: np.ndarray
    unlit: np.ndarray
    lit: np.ndarray


def random_scenes(
    n: int, seed: int, *, light: str | None = None, objects: tuple[int, int] = (1, 3)
) -> list[Scene]:
    """``n`` random scene specs, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        count = int(rng.integers(objects[0], objects[1] + 1))
        kinds: set[tuple[str, str]] = set()
        shapes = []
        while len(shapes) < count:
            kind = (str(rng.choice(COLOURS_LIST)), str(rng.choice(SHAPES)))
            if kind in kinds:
                continue
            kinds.add(kind)
            r = float(rng.uniform(0.08, 0.22)) * SIZE
            cx = float(rng.uniform(r * 0.6, SIZE - r * 0.6))
            cy = float(rng.uniform(r * 0.6, SIZE - r * 0.6))
            shapes.append(Shape(kind[1], kind[0], cx, cy, r))
        scenes.append(
            Scene(
                backdrop=str(rng.choice(list(BACKDROPS))),
                light=light or str(rng.choice(list(LIGHTS))),
                horizon=float(rng.uniform(0.3, 0.6)),
                objects=tuple(shapes),
                texture_seed=int(rng.integers(1 << 31)),
            )
        )
    return scenes


COLOURS_LIST = list(COLOURS)


def placeholder_scenes(
    n: int, seed: int, *, radius: tuple[float, float] = (14.0, 24.0)
) -> list[Scene]:
    """``n`` scenes of two objects of different colours, one in each half of the canvas.

    Drawn as grey placeholder discs named by their captions (``write_scene_psd(...,
    placeholders=True)``), they ask whether the model puts each caption in its own region.
    """
    rng = np.random.default_rng(seed)
    scenes = []
    for base in random_scenes(n, seed=seed):
        colours = rng.choice(COLOURS_LIST, 2, replace=False)
        r = rng.uniform(*radius, 2)
        xs = [rng.uniform(r[0] + 2, SIZE / 2 - r[0]), rng.uniform(SIZE / 2 + r[1], SIZE - 2 - r[1])]
        ys = [rng.uniform(rk + 2, SIZE - 2 - rk) for rk in r]
        objects = tuple(
            Shape(str(rng.choice(SHAPES)), str(c), float(x), float(y), float(rk))
            for c, x, y, rk in zip(colours, xs, ys, r, strict=True)
        )
        scenes.append(replace(base, objects=objects))
    return scenes


def disc(shape: Shape, size: int = SIZE) -> np.ndarray:
    """The (size, size) boolean disc of ``shape``'s centre and half-size: a placeholder."""
    scale = size / SIZE
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / np.float32(scale)
    return (xx - shape.cx) ** 2 + (yy - shape.cy) ** 2 <= shape.r**2


def _coverage(shape: str, x: np.ndarray, y: np.ndarray, s: Shape) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (pixels), vectorised over the grid."""
    dx, dy = x - s.cx, y - s.cy
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - s.r
    elif shape == "square":
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - s.r * 0.9
    else:  # upright isosceles triangle, apex at the top
        slope = 2.0  # 2 |dx| - dy <= r: the sides (apex at dy = -r); dy <= 0.8 r: the base
        side = (np.abs(dx) * slope - dy - s.r) / np.sqrt(1 + slope * slope)
        sdf = np.maximum(side, dy - s.r * 0.8)
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def draw(scenes: list[Scene], size: int = SIZE) -> Drawn:
    """Draw ``scenes`` at ``size`` px (coordinates scale with the canvas)."""
    n, k = len(scenes), max(len(s.objects) for s in scenes)
    scale = size / SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(scale)
    xx, yy = xx + 0.5 / scale, yy + 0.5 / scale
    backdrops = np.empty((n, size, size, 3), np.float32)
    alphas = np.zeros((n, k, size, size), np.float32)
    unlit = np.zeros((n, k, 3), np.float32)
    lit = np.zeros((n, k, 3), np.float32)
    shade = 1.0 - 0.10 * (yy - yy.mean()) / SIZE  # objects lighter at the top
    images = np.empty_like(backdrops)
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng(scene.texture_seed)
        ground, sky = (np.float32(c) for c in BACKDROPS[scene.backdrop])
        horizon = scene.horizon * SIZE
        t = np.clip((yy - horizon) / 0.8, 0.0, 1.0)[..., None]  # soft horizon line
        above = np.clip((horizon - yy) / horizon, 0, 1)[..., None]
        sky_px = sky * (1.0 - 0.15 * above)  # deeper towards the top
        ground_px = ground * (0.92 + 0.16 * (yy[..., None] - horizon) / SIZE)
        grain = rng.normal(0.0, 0.02, (size, size, 1)).astype(np.float32)
        unlit_bg = (1 - t) * sky_px + t * ground_px * (1.0 + grain)
        backdrops[i] = apply_light(unlit_bg, scene.light)
        image = backdrops[i].copy()
        for j, s in enumerate(scene.objects):
            a = _coverage(s.shape, xx, yy, s)
            colour = np.float32(COLOURS[s.colour])
            surface = apply_light(colour * shade[..., None], scene.light)
            unlit[i, j] = colour
            lit[i, j] = (surface * a[..., None]).sum((0, 1)) / max(float(a.sum()), 1e-6)
            image = image * (1 - a[..., None]) + surface * a[..., None]
            alphas[i, j] = a
        images[i] = image
    visible = alphas.copy()
    for j in range(k - 1):
        above = 1.0 - alphas[:, j + 1 :].max(axis=1)
        visible[:, j] *= np.clip(above, 0, 1)
    return Drawn(scenes, images, backdrops, alphas, visible, unlit, lit)


def layer_rgba(drawn: Drawn, index: int, slot: int) -> np.ndarray:
    """Object ``slot`` of scene ``index`` as an RGBA float layer (its own pixels, alpha)."""
    scene = drawn.scenes[index]
    s = scene.objects[slot]
    size = drawn.images.shape[1]
    yy = np.mgrid[0:size, 0:size][0].astype(np.float32) * (SIZE / size)
    shade = 1.0 - 0.10 * (yy - yy.mean()) / SIZE
    surface = apply_light(np.float32(COLOURS[s.colour]) * shade[..., None], scene.light)
    return np.concatenate([surface, drawn.alphas[index, slot][..., None]], axis=-1)


def draw_collages(scenes: list[Scene], object_lights: list[str], size: int = SIZE) -> np.ndarray:
    """(n, h, w, 3) collages: each scene's objects as drawn under ``object_lights[i]``,
    pasted onto the scene's own backdrop (what a user's PSD holds before harmonizing;
    the VAE must reconstruct these colours too, not only naturally lit ones)."""
    drawn = draw(scenes, size)
    relit = draw([s.lit(light) for s, light in zip(scenes, object_lights, strict=True)], size)
    images = drawn.backdrops.copy()
    for i, scene in enumerate(scenes):
        for slot in range(len(scene.objects)):
            rgba = layer_rgba(relit, i, slot)
            alpha = rgba[..., 3:]
            images[i] = images[i] * (1.0 - alpha) + rgba[..., :3] * alpha
    return images

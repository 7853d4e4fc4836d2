"""The public API: read a PSD, harmonize it, write the variants back.

``Renderer`` joins the three parts and is what the CLI and the hot folder use:
the reader (Photoshop -> :class:`Collage`), the engine (diffusion, no Photoshop)
and the writer (variants -> new layers). It keeps the model warm across files.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import masks
from .atomic import atomic_write
from .collage import Collage, CollageLayer, to_u8
from .errors import CollageError
from .policy import Policy
from .settings import Settings, read_sidecar, sidecar_path, validate_settings

#: progress(phase, done, total); phases: "load", "ti", "sample", "write".
Progress = Callable[[str, int, int], None]


@dataclass
class RenderResult:
    input: Path
    output: Path
    preview: Path | None
    variants: list[dict[str, Any]]  # {"seed": int, "layer": str}
    settings: dict[str, Any]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    embeddings: Path | None = None  # folder of exported textual-inversion tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "preview": str(self.preview) if self.preview else None,
            "variants": self.variants,
            "settings": self.settings,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": self.warnings,
            "embeddings": str(self.embeddings) if self.embeddings else None,
        }


def default_output(path: Path) -> Path:
    """``poster.psd`` -> ``poster.harmonized.psd`` (PSB stays PSB)."""
    return path.with_name(f"{path.stem}.harmonized{path.suffix}")


def preview_path(output: Path) -> Path:
    return output.with_suffix(".preview.png")


def embeddings_path(output: Path) -> Path:
    """``poster.harmonized.psd`` -> ``poster.harmonized.embeddings/`` (one file per token)."""
    return output.with_suffix(".embeddings")


class Renderer:
    """Loads the model once (lazily, on the first file) and keeps it warm across files."""

    def __init__(
        self,
        defaults: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        policy: Policy | None = None,
    ) -> None:
        self._defaults = validate_settings(defaults or {}, where="folder defaults")
        self._overrides = validate_settings(overrides or {}, where="command line")
        self.policy = policy  # the operator's limits (hot folder, farm); None: none
        self._engine = None

    def settings_for(self, path: Path, sidecar: Path | None = None) -> Settings:
        """Built-in < folder defaults < the file's sidecar < command line, within the policy."""
        sidecar = sidecar if sidecar is not None else sidecar_path(path)
        settings = Settings().updated(self._defaults, where="folder defaults")
        if sidecar.exists():
            settings = settings.updated(read_sidecar(sidecar), where=str(sidecar))
        settings = settings.updated(self._overrides, where="command line")
        if self.policy is not None:
            self.policy.check_settings(settings, path=path)
        return settings

    def engine_for(self, settings: Settings):
        """The engine for these settings, reused while the model options stay the same."""
        options = settings.engine_options()
        if self._engine is None or options != self._engine.options:
            from .engine import load_engine  # torch is imported only when a render needs it

            self._engine = None  # free the old model before loading the next
            self._engine = load_engine(options)
        return self._engine

    def render_file(
        self,
        path: str | Path,
        output: str | Path | None = None,
        *,
        sidecar: Path | None = None,
        preview: bool | None = None,
        in_place: bool = False,
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> RenderResult:
        """Render one file. The input is never modified unless ``in_place``."""
        from .psd.header import document_size
        from .psd.names import HARMONIZED_PREFIX
        from .psd.reader import read_collage
        from .psd.writer import write_variants

        path = Path(path)
        output = path if in_place else Path(output) if output else default_output(path)
        if not in_place and output.resolve() == path.resolve():
            raise CollageError(
                "the output would replace the input; use --in-place to do that (a .bak copy is "
                "kept) or choose another output",
                path=path,
            )
        timings: dict[str, float] = {}
        notify = progress or (lambda phase, done, total: None)

        with _timed(timings, "read"):
            settings = self.settings_for(path, sidecar)
            if preview is not None:
                settings = settings.updated({"preview": preview})
            if self.policy is not None:
                self.policy.check_canvas(document_size(path), settings.max_pixels, path=path)
            collage = read_collage(path, settings)

        with _timed(timings, "load"):
            notify("load", 0, 1)
            engine = self.engine_for(settings)
            notify("load", 1, 1)
        if self.policy is not None and settings.resolution is None:
            self.policy.check_working_resolution(engine.native_resolution, path=path)

        plan = plan_render(
            collage, settings, engine.working_size(collage.document.size, settings.resolution)
        )

        embeddings = None
        if plan.ti_layers:
            with _timed(timings, "ti"):
                tokens = _learn_layer_tokens(engine, collage, plan, settings, notify, cancel)
            if settings.export_ti:
                from .engine.textual_inversion import export_embeddings

                embeddings = export_embeddings(engine, tokens, embeddings_path(output))

        from .engine import GenerationRequest

        seed = settings.seed if settings.seed is not None else random.randrange(2**31)
        seeds = [seed + k for k in range(settings.variants)]
        request = GenerationRequest(
            image=plan.image,
            strength=plan.strength,
            prompt=plan.prompt,
            negative_prompt=collage.negative_prompt,
            phrases=plan.phrases,
            seeds=seeds,
            steps=settings.steps,
            guidance=settings.guidance,
        )
        result = engine.generate(
            request, progress=lambda done, total: notify("sample", done, total), cancel=cancel
        )
        timings.update(result.timings)

        with _timed(timings, "write"):
            notify("write", 0, 1)
            names = [f"seed {s}" for s in seeds]
            model_label = Path(str(engine.model_name)).name or str(engine.model_name)
            group = f"{HARMONIZED_PREFIX} {datetime.now():%Y-%m-%d %H:%M} {model_label}"
            full = _DocumentSized(result.images, collage.document.size)
            pin = masks.pin_weights(plan.noise, plan.work_size)
            base = collage.base.record_index if collage.editing else None
            source = _preview_source(masks.start_image(collage)) if settings.preview else None
            negative, warnings = collage.negative_prompt, list(collage.warnings)
            del collage, plan  # free the layers' pixels and masks before the writer needs memory
            write_variants(path, output, full, names, group, pin=pin, pin_base=base)
            preview_file = None
            if source is not None:
                preview_file = write_preview(preview_path(output), source, result.images, pin)
            notify("write", 1, 1)

        used = settings.as_dict()
        used.update(
            seed=seed,
            prompt=result.prompt,
            negative=negative,
            model=engine.model_name,
        )
        used["working_size"] = list(request.image.shape[1::-1])
        return RenderResult(
            input=path,
            output=output,
            preview=preview_file,
            variants=[{"seed": s, "layer": n} for s, n in zip(seeds, names, strict=True)],
            settings=used,
            timings=timings,
            warnings=warnings + list(result.warnings),
            embeddings=embeddings,
        )


def render_file(
    path: str | Path, output: str | Path | None = None, **settings: Any
) -> RenderResult:
    """One-off convenience: ``render_file("poster.psd", model="tiny", variants=2)``."""
    return Renderer(overrides=settings).render_file(path, output)


# ---------------------------------------------------------------------------
# From a collage to an engine request (numpy only)
# ---------------------------------------------------------------------------


@dataclass
class RenderPlan:
    work_size: tuple[int, int]
    image: np.ndarray  # (h, w, 3) float32 at the working size
    noise: np.ndarray  # (H, W) float32 at document size, unblurred
    strength: np.ndarray  # (h, w) float32, blurred
    prompt: str
    phrases: list  # engine SteeredPhrase
    ti_layers: list[int] = field(default_factory=list)  # indices into collage.layers


def plan_render(collage: Collage, settings: Settings, work_size: tuple[int, int]) -> RenderPlan:
    """Everything the engine needs, at the working resolution."""
    from .engine import SteeredPhrase

    noise = masks.noise_map(collage, settings.noise)
    if not noise.any():
        raise CollageError(
            "every layer is locked (noise 0), so nothing may change: unlock a layer or give it a noise tag",
            path=collage.document.path,
        )
    image = _resize_rgb(masks.start_image(collage), work_size)
    strength = masks.strength_map(noise, work_size)
    phrases, ti_layers = [], []
    for index, layer in enumerate(collage.layers):
        if layer.options.ti if layer.options.ti is not None else settings.ti:
            if layer.caption and layer.visible_area > 0:
                ti_layers.append(index)
            else:
                collage.warnings.append(
                    f"layer {layer.name!r}: textual inversion needs a caption and visible "
                    "pixels; skipped"
                )
        if not layer.steered:
            continue
        default_inside, default_outside = masks.default_attention_weights(layer.visible_area)
        inside = layer.options.inside if layer.options.inside is not None else default_inside
        outside = layer.options.outside if layer.options.outside is not None else default_outside
        mask = layer_at(layer, collage.document.size, work_size)[..., 4]
        phrases.append(SteeredPhrase(text=layer.caption, mask=mask, inside=inside, outside=outside))
    return RenderPlan(work_size, image, noise, strength, collage.prompt, phrases, ti_layers)


def layer_at(
    layer: CollageLayer, doc_size: tuple[int, int], work_size: tuple[int, int]
) -> np.ndarray:
    """The layer on a working-size canvas: (h, w, 5) float32 = RGB, alpha, visible mask."""
    (doc_w, doc_h), (work_w, work_h) = doc_size, work_size
    sx, sy = work_w / doc_w, work_h / doc_h
    left, top, right, bottom = layer.box
    x0, y0 = int(np.floor(left * sx)), int(np.floor(top * sy))
    x1, y1 = max(x0 + 1, int(np.ceil(right * sx))), max(y0 + 1, int(np.ceil(bottom * sy)))
    x1, y1 = min(x1, work_w), min(y1, work_h)
    planes = np.concatenate(
        [layer.pixels.astype(np.float32) / 255.0, layer.visible[..., None].astype(np.float32)],
        axis=2,
    )
    # Crop-resize the layer's box onto the cells [x0, x1) x [y0, y1) it touches; the cells
    # reach up to one cell past the box, so pad with transparency (PIL wants the box inside).
    pad = int(np.ceil(max(1 / sx, 1 / sy))) + 1
    planes = np.pad(planes, ((pad, pad), (pad, pad), (0, 0)))
    box = (x0 / sx - left + pad, y0 / sy - top + pad, x1 / sx - left + pad, y1 / sy - top + pad)
    out = np.zeros((work_h, work_w, 5), np.float32)
    for c in range(5):
        plane = Image.fromarray(np.ascontiguousarray(planes[..., c]), mode="F")
        out[y0:y1, x0:x1, c] = np.asarray(
            plane.resize((x1 - x0, y1 - y0), Image.Resampling.BOX, box=box), np.float32
        )
    return out


def composite_up_to(collage: Collage, index: int, work_size: tuple[int, int]) -> np.ndarray:
    """The collage composited from the back up to layer ``index`` (the textual-inversion image)."""
    work_w, work_h = work_size
    out = np.full((work_h, work_w, 3), 0.5, np.float32)  # neutral grey where nothing is yet
    for layer in collage.layers[: index + 1]:
        planes = layer_at(layer, collage.document.size, work_size)
        alpha = planes[..., 3:4]
        out = out * (1 - alpha) + planes[..., :3] * alpha
    return out


def _learn_layer_tokens(engine, collage, plan, settings, notify, cancel) -> list[str]:
    """Learn (or load from the cache) one token per TI layer and put it before its caption."""
    from .engine.textual_inversion import InversionSettings, InversionTarget, learn_tokens

    targets = [
        InversionTarget(
            name=collage.layers[i].name,
            image=composite_up_to(collage, i, plan.work_size),
            mask=layer_at(collage.layers[i], collage.document.size, plan.work_size)[..., 4],
            caption=collage.layers[i].caption,
        )
        for i in plan.ti_layers
    ]
    ti = InversionSettings(
        steps=settings.ti_steps, lr=settings.ti_lr, batch=settings.ti_batch, seed=settings.seed or 0
    )
    tokens = learn_tokens(
        engine, targets, ti, progress=lambda d, t: notify("ti", d, t), cancel=cancel
    )
    by_caption = {
        collage.layers[i].caption: tok for i, tok in zip(plan.ti_layers, tokens, strict=True)
    }
    for phrase in plan.phrases:
        token = by_caption.get(phrase.text)
        if token is None:
            continue
        tokened = f"{token} {phrase.text}"
        if phrase.text in plan.prompt:
            plan.prompt = plan.prompt.replace(phrase.text, tokened, 1)
        phrase.text = tokened
    return tokens


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


PREVIEW_HEIGHT = 384


class _DocumentSized(Sequence):
    """The variants upscaled to document size one at a time, as the writer asks for them.

    Holding four 8000 x 6000 float variants at once would cost 2.3 GB.
    """

    def __init__(self, images: Sequence[np.ndarray], size: tuple[int, int]) -> None:
        self._images, self._size = images, size

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image = self._images[index]
        if image.shape[1::-1] == tuple(self._size):
            return image.astype(np.float32, copy=False)
        return _resize_rgb(to_u8(image), self._size)


def _resize_rgb(image_u8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (h, w, 3) in [0, 1] at ``size`` (width, height)."""
    pil = Image.fromarray(image_u8, "RGB")
    if pil.size != tuple(size):
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(pil, np.float32) / 255.0


def _preview_source(image: np.ndarray, height: int = PREVIEW_HEIGHT) -> np.ndarray:
    """The source picture shrunk to preview height now, so the full-size one can be freed."""
    pil = Image.fromarray(image, "RGB")
    width = max(1, round(pil.width * height / pil.height))
    return np.asarray(pil.resize((width, height), Image.Resampling.LANCZOS))


def write_preview(
    path: Path,
    source: np.ndarray,
    variants: Sequence[np.ndarray],
    pin: np.ndarray | None = None,
    height: int = PREVIEW_HEIGHT,
) -> Path:
    """Source and variants side by side, so results can be browsed without Photoshop.

    The variants show what the PSD layers hold: pinned pixels pasted back from the source.
    """
    doc_h, doc_w = source.shape[:2]
    size = (max(1, round(doc_w * height / doc_h)), height)
    base = _resize_rgb(source, size)
    weight = masks.resize_map(pin, size)[..., None] if pin is not None else 0.0
    tiles = [base] + [_resize_rgb(to_u8(v), size) * (1 - weight) + base * weight for v in variants]
    gap = 8
    sheet = Image.new("RGB", (len(tiles) * (size[0] + gap) - gap, height), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(Image.fromarray(to_u8(tile), "RGB"), (k * (size[0] + gap), 0))
    return atomic_write(path, lambda fh: sheet.save(fh, format="PNG"))


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start

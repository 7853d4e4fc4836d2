"""The public API: read a PSD, harmonize it, write the variants back.

``Renderer`` joins the three parts and is what the CLI and the hot folder use:
the reader (Photoshop -> :class:`Collage`), the engine (diffusion, no Photoshop)
and the writer (variants -> new layers). It keeps the model warm across files.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import masks
from .collage import Collage
from .errors import CollageError, SettingsError, TagError
from .geometry import DocumentSized, composite_up_to, resize_rgb, visible_mask_at
from .policy import Policy
from .preview import preview_path, preview_source, write_preview
from .settings import LoraSpec, Settings, read_sidecar, sidecar_path, validate_settings

#: progress(phase, done, total); phases: "load", "ti", "sample", "write".
Progress = Callable[[str, int, int], None]

#: Seeds are drawn below this when the settings give none (fits every sampler's generator).
SEED_RANGE = 2**31


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
        *,
        cache: Any = None,
    ) -> None:
        """``cache``: a :class:`psd_collage.engine.cache.ModelCache` to share (default: own)."""
        self._defaults = validate_settings(defaults or {}, where="folder defaults")
        self._overrides = validate_settings(overrides or {}, where="command line")
        self.policy = policy  # the operator's limits (hot folder, farm); None: none
        self._cache = cache

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

    @property
    def cache(self):
        """The warm models (engines, ControlNets, LoRA files), made on first use."""
        if self._cache is None:
            from .engine.cache import ModelCache  # torch is imported only when a render needs it

            self._cache = ModelCache()
        return self._cache

    def engine_for(self, settings: Settings):
        """The engine for these settings from the warm cache (kept by its options), with
        the ControlNet and LoRAs the settings name attached and any others taken off."""
        from .engine import load_engine  # torch is imported only when a render needs it
        from .engine.cache import module_bytes, tensors_bytes
        from .engine.controlnet import load_controlnet
        from .engine.lora import LoadedLora, lora_identity, read_lora

        options = settings.engine_options()
        engine = self.cache.get(
            "model",
            options,
            lambda: load_engine(options),
            lambda loaded: module_bytes(module for _, module in loaded.components.modules()),
        )
        controlnet = None
        if settings.controlnet:
            controlnet = self.cache.get(
                "controlnet",
                (settings.controlnet, options),
                lambda: load_controlnet(
                    settings.controlnet,
                    engine.components.unet,
                    dtype=engine.dtype,
                    allow_pickle=settings.allow_pickle,
                ),
                lambda model: module_bytes([model]),
            )
        engine.use_controlnet(controlnet, settings.controlnet)
        loras = []
        for spec in map(LoraSpec.parse, settings.lora):
            identity = lora_identity(spec.path)
            tensors = self.cache.get(
                "lora",
                identity,
                lambda spec=spec: read_lora(spec.path, allow_pickle=settings.allow_pickle),
                tensors_bytes,
            )
            loras.append(LoadedLora(spec.path, identity, tensors, spec.scale))
        engine.use_loras(loras)
        return engine

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
        """Render one file. The input is never modified unless ``in_place``.

        Data flows one way: read the collage, learn its textual-inversion tokens, plan
        the request with them, generate, write.
        """
        from .psd.header import document_size
        from .psd.reader import read_collage

        path = Path(path)
        job = _Job(path, _output_for(path, output, in_place), progress, cancel)
        with _timed(job.timings, "read"):
            settings = self.settings_for(path, sidecar)
            if preview is not None:
                settings = settings.updated({"preview": preview})
            if self.policy is not None:
                self.policy.check_canvas(document_size(path), settings.max_pixels, path=path)
            collage = read_collage(path, settings)
            check_canny(collage, settings)
        with _timed(job.timings, "load"):
            job.notify("load", 0, 1)
            engine = self.engine_for(settings)
            job.notify("load", 1, 1)
        if self.policy is not None and settings.resolution is None:
            self.policy.check_working_resolution(engine.native_resolution, path=path)
        noise = changeable_noise(collage)
        work_size = engine.working_size(collage.document.size, settings.resolution)
        tokens = self._learn_tokens(engine, collage, settings, work_size, job)
        plan = plan_render(collage, settings, work_size, noise, tokens)
        seed = settings.seed if settings.seed is not None else random.randrange(SEED_RANGE)
        request = plan.request(collage.negative_prompt, seed, settings)
        result = engine.generate(
            request, progress=lambda done, total: job.notify("sample", done, total), cancel=cancel
        )
        job.timings.update(result.timings)
        negative, warnings = collage.negative_prompt, collage.warnings + list(result.warnings)
        output = _WriteInputs.of(collage, plan, settings)
        del collage, plan, noise  # free the layers, masks and maps before the writer needs memory
        preview_file = self._write(engine, output, result.images, request.seeds, job)
        used = settings.as_dict()
        used.update(seed=seed, prompt=result.prompt, negative=negative, model=engine.model_name)
        used["working_size"] = list(work_size)
        return RenderResult(
            input=path,
            output=job.output,
            preview=preview_file,
            variants=[{"seed": s, "layer": _variant_name(s)} for s in request.seeds],
            settings=used,
            timings=job.timings,
            warnings=warnings,
            embeddings=job.embeddings,
        )

    def _learn_tokens(
        self,
        engine: Any,
        collage: Collage,
        settings: Settings,
        work_size: tuple[int, int],
        job: _Job,
    ) -> dict[str, str]:
        """Caption -> learned token for the layers asking for textual inversion (or none)."""
        indices = inversion_layers(collage, settings)
        if not indices:
            return {}
        from .engine.textual_inversion import export_embeddings

        with _timed(job.timings, "ti"):
            tokens = learn_layer_tokens(engine, collage, indices, settings, work_size, job)
        if settings.export_ti:
            job.embeddings = export_embeddings(
                engine, list(tokens.values()), embeddings_path(job.output)
            )
        return tokens

    def _write(
        self,
        engine: Any,
        inputs: _WriteInputs,
        images: list[np.ndarray],
        seeds: list[int],
        job: _Job,
    ) -> Path | None:
        """The variants into the PSD, and the preview if asked for; the preview's path."""
        from .psd.names import HARMONIZED_PREFIX
        from .psd.writer import write_variants

        with _timed(job.timings, "write"):
            job.notify("write", 0, 1)
            model_label = Path(str(engine.model_name)).name or str(engine.model_name)
            group = f"{HARMONIZED_PREFIX} {datetime.now():%Y-%m-%d %H:%M} {model_label}"
            full = DocumentSized(images, inputs.size)
            names = [_variant_name(s) for s in seeds]
            write_variants(
                job.path, job.output, full, names, group, pin=inputs.pin, pin_base=inputs.base
            )
            preview_file = None
            if inputs.preview_source is not None:
                preview_file = write_preview(
                    preview_path(job.output), inputs.preview_source, images, inputs.pin
                )
            job.notify("write", 1, 1)
        return preview_file


def render_file(
    path: str | Path, output: str | Path | None = None, **settings: Any
) -> RenderResult:
    """One-off convenience: ``render_file("poster.psd", model="tiny", variants=2)``."""
    return Renderer(overrides=settings).render_file(path, output)


@dataclass
class _Job:
    """One file's render: where it goes, how to report, what it measured."""

    path: Path
    output: Path
    progress: Progress | None
    cancel: Callable[[], bool] | None
    timings: dict[str, float] = field(default_factory=dict)
    embeddings: Path | None = None

    def notify(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)


@dataclass
class _WriteInputs:
    """What the writer needs from the collage, so that the collage can be freed first."""

    size: tuple[int, int]  # the document's (width, height)
    pin: np.ndarray  # (H, W) float32: 1 where the source's pixels are kept exactly
    base: int | None  # record index of the earlier variant an edit starts from
    preview_source: np.ndarray | None  # the start image at preview height, if asked for

    @classmethod
    def of(cls, collage: Collage, plan: RenderPlan, settings: Settings) -> _WriteInputs:
        source = masks.start_image(collage) if settings.preview else None
        return cls(
            size=collage.document.size,
            pin=masks.pin_weights(plan.noise, plan.work_size),
            base=collage.base.record_index if collage.editing else None,
            preview_source=preview_source(source) if source is not None else None,
        )


def _output_for(path: Path, output: str | Path | None, in_place: bool) -> Path:
    out = path if in_place else Path(output) if output else default_output(path)
    if not in_place and out.resolve() == path.resolve():
        raise CollageError(
            "the output would replace the input; use --in-place to do that (a .bak copy is "
            "kept) or choose another output",
            path=path,
        )
    return out


def _variant_name(seed: int) -> str:
    """The variant layer's name in the [harmonized] group."""
    return f"seed {seed}"


# ---------------------------------------------------------------------------
# From a collage to an engine request (numpy only)
# ---------------------------------------------------------------------------


@dataclass
class RenderPlan:
    work_size: tuple[int, int]
    image: np.ndarray  # (h, w, 3) float32 at the working size
    noise: np.ndarray  # (H, W) float32 at document size, unblurred
    strength: np.ndarray  # (h, w) float32, blurred
    prompt: str  # the collage's prompt, learned tokens in front of their captions
    phrases: list  # engine SteeredPhrase, learned tokens included
    control: np.ndarray | None = None  # (h, w) ControlNet scale (canny), None: no ControlNet

    def request(self, negative: str, seed: int, settings: Settings):
        """The engine request: one variant per seed from ``seed`` on."""
        from .engine import GenerationRequest

        return GenerationRequest(
            image=self.image,
            strength=self.strength,
            prompt=self.prompt,
            negative_prompt=negative,
            phrases=self.phrases,
            seeds=[seed + k for k in range(settings.variants)],
            steps=settings.steps,
            guidance=settings.guidance,
            control=self.control,
        )


def changeable_noise(collage: Collage) -> np.ndarray:
    """The unblurred noise map; an error if it is zero everywhere (nothing may change)."""
    noise = masks.noise_map(collage)
    if not noise.any():
        raise CollageError(
            "every layer is locked (noise 0), so nothing may change: unlock a layer or give it a noise tag",
            path=collage.document.path,
        )
    return noise


def check_canny(collage: Collage, settings: Settings) -> bool:
    """Whether a ControlNet is in use; a ``canny`` without one is one error naming the layer
    (or the setting) that asked for it, before any model is loaded."""
    asking = [layer for layer in collage.layers if layer.options.canny]
    if not settings.controlnet:
        if asking:
            layer = asking[0]
            raise TagError(
                f"layer {layer.name!r} asks for canny={layer.options.canny:g}, which needs a "
                "ControlNet: pass --controlnet (a canny ControlNet for this model) or remove "
                "the canny tag",
                path=collage.document.path,
            )
        if settings.canny:
            raise SettingsError(
                f"canny={settings.canny:g} needs a ControlNet: pass --controlnet (a canny "
                "ControlNet for this model) or set canny to 0",
                path=collage.document.path,
            )
        return False
    return True


def inversion_layers(collage: Collage, settings: Settings) -> list[int]:
    """Indices of the layers that get textual inversion (a warning for those that cannot)."""
    chosen = []
    for index, layer in enumerate(collage.layers):
        if not (layer.options.ti if layer.options.ti is not None else settings.ti):
            continue
        if layer.caption and layer.visible_area > 0:
            chosen.append(index)
        else:
            collage.warnings.append(
                f"layer {layer.name!r}: textual inversion needs a caption and visible "
                "pixels; skipped"
            )
    return chosen


def plan_render(
    collage: Collage,
    settings: Settings,
    work_size: tuple[int, int],
    noise: np.ndarray | None = None,
    tokens: Mapping[str, str] | None = None,
    *,
    size_measure: str = masks.DEFAULT_SIZE_MEASURE,
) -> RenderPlan:
    """Everything the engine needs, at the working resolution.

    ``tokens`` (caption -> learned token) go in front of their captions, in the phrases
    and in the prompt. ``size_measure``: how the automatic attention weights measure a
    layer's size (:data:`masks.SIZE_MEASURES`).
    """
    from .engine import SteeredPhrase

    noise = changeable_noise(collage) if noise is None else noise
    tokens = tokens or {}
    prompt = collage.prompt
    for caption, token in tokens.items():
        if any(layer.steered and layer.caption == caption for layer in collage.layers):
            prompt = prompt.replace(caption, f"{token} {caption}", 1)
    phrases = []
    for layer in collage.layers:
        if not layer.steered:
            continue
        r = masks.layer_size(layer, collage.document.size, size_measure)
        default_inside, default_outside = masks.default_attention_weights(r)
        inside = layer.options.inside if layer.options.inside is not None else default_inside
        outside = layer.options.outside if layer.options.outside is not None else default_outside
        token = tokens.get(layer.caption)
        text = f"{token} {layer.caption}" if token else layer.caption
        mask = visible_mask_at(layer, collage.document.size, work_size)
        phrases.append(SteeredPhrase(text=text, mask=mask, inside=inside, outside=outside))
    return RenderPlan(
        work_size=work_size,
        image=resize_rgb(masks.start_image(collage), work_size),
        noise=noise,
        strength=masks.strength_map(noise, work_size),
        prompt=prompt,
        phrases=phrases,
        control=control_at(collage, settings, work_size),
    )


def control_at(
    collage: Collage, settings: Settings, work_size: tuple[int, int]
) -> np.ndarray | None:
    """The ControlNet's scale map (canny) at the working size; None without a ControlNet
    or where no pixel asks for one."""
    if not check_canny(collage, settings):
        return None
    control = masks.control_map(collage, settings.canny)
    return masks.resize_map(control, work_size) if control.any() else None


def learn_layer_tokens(
    engine: Any,
    collage: Collage,
    indices: list[int],
    settings: Settings,
    work_size: tuple[int, int],
    job: _Job,
) -> dict[str, str]:
    """Learn (or load from the cache) one token per layer; caption -> token."""
    from .engine.textual_inversion import InversionSettings, InversionTarget, learn_tokens

    size = collage.document.size
    targets = [
        InversionTarget(
            name=collage.layers[i].name,
            image=composite_up_to(collage, i, work_size),
            mask=visible_mask_at(collage.layers[i], size, work_size),
            caption=collage.layers[i].caption,
        )
        for i in indices
    ]
    recipe = InversionSettings(
        steps=settings.ti_steps, lr=settings.ti_lr, batch=settings.ti_batch, seed=settings.seed or 0
    )
    tokens = learn_tokens(
        engine,
        targets,
        recipe,
        progress=lambda done, total: job.notify("ti", done, total),
        cancel=job.cancel,
    )
    return {collage.layers[i].caption: tok for i, tok in zip(indices, tokens, strict=True)}


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start

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

from . import masks
from .collage import Collage, CollageLayer
from .errors import Cancelled, CollageError, SettingsError, TagError
from .geometry import DocumentSized, composite_up_to, resize_rgb, visible_mask_at
from .policy import Policy
from .preview import preview_path, preview_source, write_preview
from .prompt_check import check_prompt
from .psd.names import HARMONIZED_PREFIX
from .settings import (
    LoraSpec,
    Settings,
    has_sidecar,
    read_sidecar,
    sidecar_path,
    validate_settings,
)

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


HARMONIZED_SUFFIX = ".harmonized"


def default_output(path: Path) -> Path:
    """``poster.psd`` -> ``poster.harmonized.psd`` (PSB stays PSB).

    A file that already is an output (``poster.harmonized.psd``) maps to itself, so
    names never pile up: rendering it again means ``--in-place`` or ``-o``.
    """
    if path.stem.endswith(HARMONIZED_SUFFIX):
        return path
    return path.with_name(f"{path.stem}{HARMONIZED_SUFFIX}{path.suffix}")


def resolve_output(
    path: Path, output: str | Path | None, *, in_place: bool = False, overwrite: bool = False
) -> Path:
    """Where a render of ``path`` writes; refuses to replace any file not named for it.

    An existing output is never replaced silently: that file may hold the designer's
    edits. ``overwrite`` allows it; ``in_place`` replaces the input (keeping a
    ``.bak`` of the very first original).
    """
    if in_place:
        if output is not None:
            raise CollageError("use either -o/--output or --in-place, not both")
        return path
    if output is not None and not str(output).strip():
        raise CollageError("-o/--output is empty; name an output file such as out.psd")
    target = Path(output) if output is not None else default_output(path)
    if target.is_dir():
        raise CollageError("is a folder; name an output file such as out.psd", path=target)
    if _same_path(target, path):
        if output is None:
            raise CollageError(
                "is already a harmonized output: render it with --in-place to add one more "
                "group to its history (a .bak copy of the first original is kept), or choose "
                "another output with -o",
                path=path,
            )
        raise CollageError(
            "the output would replace the input; use --in-place to do that (a .bak copy is "
            "kept) or choose another output",
            path=path,
        )
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise CollageError(
            "exists already and may hold your edits; use --overwrite to replace it, or -o "
            "to choose another name",
            path=target,
        )
    return target


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


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

    def settings_for(
        self, path: Path, sidecar: Path | None = None, *, like: str | None = None
    ) -> Settings:
        """Built-in < folder defaults < the file's sidecar < ``like`` < command line,
        within the policy."""
        sidecar = sidecar if sidecar is not None else sidecar_path(path)
        settings = Settings().updated(self._defaults, where="folder defaults")
        if has_sidecar(sidecar):
            settings = settings.updated(read_sidecar(sidecar), where=str(sidecar))
        if like is not None:
            settings = settings.updated(like_settings(path, like), where=f"--like {like!r}")
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
        overwrite: bool = False,
        like: str | None = None,
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> RenderResult:
        """Render one file. The input is never modified unless ``in_place``.

        An existing output is refused unless ``overwrite`` (see :func:`resolve_output`);
        ``like="GROUP/seed N"`` reproduces that earlier variant (:func:`like_settings`).
        Data flows one way: read the collage, learn its textual-inversion tokens, plan
        the request with them, generate, write. ``warn(text)`` hears each warning as soon
        as it is known, before sampling for all that ``inspect`` predicts (the document's,
        the prompt's tokens, captions that will not be steered); the result has them all.
        """
        from .psd.header import document_size
        from .psd.reader import read_collage

        path = Path(path)
        output_path = resolve_output(path, output, in_place=in_place, overwrite=overwrite)
        job = _Job(path, output_path, progress, cancel, warn)
        with _timed(job.timings, "read"):
            settings = self.settings_for(path, sidecar, like=like)
            if preview is not None:
                settings = settings.updated({"preview": preview})
            if self.policy is not None:
                self.policy.check_canvas(document_size(path), settings.max_pixels, path=path)
            collage = read_collage(path, settings, cancel=cancel)
            check_canny(collage, settings)
        job.warn(collage.warnings)
        job.check_cancel()  # a job timeout covers reading: stop before loading the model
        with _timed(job.timings, "load"):
            job.notify("load", 0, 1)
            engine = self.engine_for(settings)
            job.notify("load", 1, 1)
        job.check_cancel()
        if like is not None:
            collage.warnings.extend(_like_mismatch(path, like, engine.weights_hash))
        if self.policy is not None and settings.resolution is None:
            self.policy.check_working_resolution(engine.native_resolution, path=path)
        noise = changeable_noise(collage)
        work_size = engine.working_size(collage.document.size, settings.resolution)
        job.warn([*collage.warnings, *check_prompt(collage, engine.prompt_reader()).warnings])
        tokens = self._learn_tokens(engine, collage, settings, work_size, job)
        job.warn(collage.warnings)  # layers that cannot learn a token
        plan = plan_render(collage, settings, work_size, noise, tokens, engine.insert_tokens)
        seed = settings.seed if settings.seed is not None else random.randrange(SEED_RANGE)
        request = plan.request(collage.negative_prompt, seed, settings)
        result = engine.generate(
            request, progress=lambda done, total: job.notify("sample", done, total), cancel=cancel
        )
        job.timings.update(result.timings)
        job.warn(result.warnings)  # what only sampling found (e.g. a noise too low for the steps)
        negative = collage.negative_prompt
        output = _WriteInputs.of(collage, plan, settings)
        output.record = render_record(
            collage, settings, engine, request.seeds, result.prompt, work_size
        )
        del collage, plan, noise  # free the layers, masks and maps before the writer needs memory
        job.check_cancel()
        preview_file = self._write(output, result.images, request.seeds, job)
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
            warnings=list(job.warned),
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
        inputs: _WriteInputs,
        images: list[np.ndarray],
        seeds: list[int],
        job: _Job,
    ) -> Path | None:
        """The variants into the PSD, and the preview if asked for; the preview's path."""
        from .psd.writer import write_variants

        with _timed(job.timings, "write"):
            job.notify("write", 0, 1)
            full = DocumentSized(images, inputs.size)
            names = [_variant_name(s) for s in seeds]
            write_variants(
                job.path,
                job.output,
                full,
                names,
                inputs.group,
                pin=inputs.pin,
                pin_base=inputs.base,
                record=inputs.record,
                pin_document=inputs.left_by_redo,
                insert_at=inputs.insert_at,
                overlay=inputs.overlay,
            )
            preview_file = None
            if inputs.preview_source is not None:
                preview_file = write_preview(
                    preview_path(job.output),
                    inputs.preview_source,
                    images,
                    inputs.pin,
                    names=names,
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
    on_warning: Callable[[str], None] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    embeddings: Path | None = None
    warned: list[str] = field(default_factory=list)  # every warning once, in order

    def notify(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    def warn(self, warnings: Sequence[str]) -> None:
        """Hand on the warnings not given yet (each is given once, as soon as it is known)."""
        for warning in warnings:
            if warning in self.warned:
                continue
            self.warned.append(warning)
            if self.on_warning is not None:
                self.on_warning(warning)

    def check_cancel(self) -> None:
        """Between phases: a cancel (or a job timeout) stops the job here."""
        if self.cancel is not None and self.cancel():
            raise Cancelled()


@dataclass
class _WriteInputs:
    """What the writer needs from the collage, so that the collage can be freed first."""

    size: tuple[int, int]  # the document's (width, height)
    pin: np.ndarray  # (H, W) float32: 1 where the source's pixels are kept exactly
    base: int | None  # record index of the earlier variant an edit starts from
    preview_source: np.ndarray | None  # the start image at preview height, if asked for
    group: str  # the new [harmonized] group's name
    left_by_redo: np.ndarray | None  # (H, W) bool: pinned to the document, not the base
    insert_at: int | None  # top-level layers below the new group; None: on top
    overlay: np.ndarray | None  # (H, W, 4) uint8: live layers above it, for the merged image
    record: dict[str, Any] | None = None  # this render's settings, for the document's XMP

    @classmethod
    def of(cls, collage: Collage, plan: RenderPlan, settings: Settings) -> _WriteInputs:
        source = masks.start_image(collage) if settings.preview else None
        vacated = masks.vacated_mask(collage)
        return cls(
            size=collage.document.size,
            pin=masks.pin_weights(plan.noise, plan.work_size),
            base=collage.base.record_index if collage.editing else None,
            preview_source=preview_source(source) if source is not None else None,
            group=group_name(settings.model, collage.earlier_groups),
            left_by_redo=vacated > 0 if vacated is not None else None,
            insert_at=collage.output_at,
            overlay=collage.overlay,
        )


#: Recorded settings that ``--like`` takes over (the rest is the document as it is now).
LIKE_KEYS = (
    "model",
    "prompt",
    "negative",
    "steps",
    "guidance",
    "scheduler",
    "resolution",
    "noise",
    "lora",
    "controlnet",
    "canny",
)


def like_record(path: Path, like: str) -> tuple[dict[str, Any], int]:
    """The recorded render of variant ``like`` (``"GROUP/seed N"``) of ``path``, and its seed."""
    from .psd.history import find_variant, read_renders_from_file

    try:
        return find_variant(read_renders_from_file(path), like)
    except KeyError as exc:
        raise CollageError(f"--like {like!r}: {exc.args[0]}", path=path) from None


def like_settings(path: Path, like: str) -> dict[str, Any]:
    """The settings that made variant ``like`` of ``path``, for one variant."""
    record, seed = like_record(path, like)
    values = {key: record[key] for key in LIKE_KEYS if record.get(key) is not None}
    return {**values, "seed": seed, "variants": 1}


def _like_mismatch(path: Path, like: str, weights: str | None) -> list[str]:
    recorded = like_record(path, like)[0].get("weights")
    if recorded in (None, weights):
        return []
    return [
        f"--like {like!r}: the model's weights differ from the recorded ones, so the variant "
        "will not come out the same"
    ]


def group_name(model: str, taken: Sequence[str] = (), now: datetime | None = None) -> str:
    """``[harmonized] 2026-11-25 14:03:07 model``: unique to the second, and among ``taken``."""
    label = Path(str(model)).name or str(model)
    name = f"{HARMONIZED_PREFIX} {(now or datetime.now()):%Y-%m-%d %H:%M:%S} {label}"
    candidate, count = name, 1
    while candidate in taken:
        count += 1
        candidate = f"{name} ({count})"
    return candidate


def render_record(
    collage: Collage,
    settings: Settings,
    engine: Any,
    seeds: Sequence[int],
    prompt: str,
    work_size: tuple[int, int],
) -> dict[str, Any]:
    """What a render did, stored in the document (design section 3) for ``--like``/``redo``."""
    from . import __version__

    layers = []
    for layer in collage.layers:
        inside, outside = layer_weights(layer, collage.document.size)
        layers.append(
            {
                "id": layer.layer_id,
                "name": layer.name,
                "caption": layer.caption,
                "box": list(layer.box),
                "noise": round(float(layer.noise), 6),
                "inside": round(inside, 6),
                "outside": round(outside, 6),
                "steered": layer.steered,
                "ti": layer.uses_ti(settings.ti),
                "redo": layer.redo,
            }
        )
    base = collage.base
    return {
        "psd_collage": __version__,
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": str(engine.model_name),
        "weights": getattr(engine, "weights_hash", None),  # the base model's, before LoRAs
        "model_identity": str(getattr(engine, "model_identity", engine.model_name)),
        "lora": list(settings.lora),
        "controlnet": settings.controlnet,
        "canny": settings.canny,
        "prompt": collage.prompt,
        "final_prompt": prompt,
        "negative": collage.negative_prompt,
        "variants": [{"layer": _variant_name(s), "seed": s} for s in seeds],
        "steps": settings.steps,
        "guidance": settings.guidance,
        "scheduler": settings.scheduler,
        "resolution": settings.resolution,
        "working_size": list(work_size),
        "noise": settings.noise,
        "base": {"group": base.group, "layer": base.layer} if collage.editing and base else None,
        "layers": layers,
    }


def layer_weights(
    layer: CollageLayer,
    size: tuple[int, int],
    measure: str = masks.DEFAULT_SIZE_MEASURE,
) -> tuple[float, float]:
    """The layer's attention weights (inside, outside): its tags, else the size rule."""
    r = masks.layer_size(layer, size, measure)
    default_inside, default_outside = masks.default_attention_weights(r)
    inside = layer.options.inside if layer.options.inside is not None else default_inside
    outside = layer.options.outside if layer.options.outside is not None else default_outside
    return float(inside), float(outside)


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
        if not layer.uses_ti(settings.ti):
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
    insert_tokens: Callable[[str, dict[str, str]], str] | None = None,
    *,
    size_measure: str = masks.DEFAULT_SIZE_MEASURE,
) -> RenderPlan:
    """Everything the engine needs, at the working resolution.

    The prompt is the collage's, with the captions it lacks appended
    (:attr:`Collage.final_prompt`). ``tokens`` (caption -> learned token) go in front of
    their captions in the phrases, and in the prompt where ``insert_tokens`` (the
    engine's, which locates captions by their tokens as steering does) puts them.
    ``size_measure``: how the automatic attention weights measure a layer's size
    (:data:`masks.SIZE_MEASURES`).
    """
    from .engine import SteeredPhrase

    noise = changeable_noise(collage) if noise is None else noise
    steered = {layer.caption for layer in collage.layers if layer.steered}
    tokens = {caption: token for caption, token in (tokens or {}).items() if caption in steered}
    prompt = collage.final_prompt
    if tokens:
        if insert_tokens is None:
            raise ValueError("learned tokens need the engine's insert_tokens to place them")
        prompt = insert_tokens(prompt, tokens)
    phrases = []
    for layer in collage.layers:
        if not layer.steered:
            continue
        inside, outside = layer_weights(layer, collage.document.size, size_measure)
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

"""The engine the render calls: load a model once, then generate collage variants.

Diffusion only: nothing here knows about Photoshop files.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel

from ..errors import SettingsError
from ..settings import EngineOptions
from .attention import AttentionRecorder, SteeringState, install_processors
from .captions import PromptReader, clip_reader
from .controlnet import ControlInputs, canny_edges, check_fits
from .lora import LoadedLora, Originals, fuse_loras, unfuse_loras
from .models import (
    ModelComponents,
    check_scheduler,
    load_components,
    make_scheduler,
    resolve_device,
    resolve_dtype,
    weights_digest,
)
from .sampler import (
    DEFAULT_PIN_DILATION,
    DEFAULT_STEERING_SCHEDULE,
    Conditioning,
    decode_latents,
    denoise,
    encode_image,
    sdxl_time_ids,
    steps_to_run,
    strength_to_latents,
    too_few_steps,
)
from .tokens import (
    PromptEmbeddings,
    Span,
    encode_prompt,
    insert_before_captions,
    locate_captions,
)

#: Seeds denoised together in one UNet batch (more is faster on a big GPU, costs memory).
DEFAULT_MAX_BATCH = 4


@dataclass
class SteeredPhrase:
    """One collage layer's caption to steer into its visible mask."""

    text: str  # the caption (may start with a textual-inversion token such as "<ti-3a9f>")
    mask: np.ndarray  # (h, w) float32 in [0, 1] at the request's image size
    inside: float  # w_pos
    outside: float  # w_neg


@dataclass
class GenerationRequest:
    """One collage at the working resolution."""

    image: np.ndarray  # (h, w, 3) float32 sRGB in [0, 1]; h, w multiples of 64
    strength: np.ndarray  # (h, w) float32 in [0, 1], already blurred
    prompt: str
    negative_prompt: str = ""
    phrases: list[SteeredPhrase] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 50
    guidance: float = 7.0
    # (h, w) float32 in [0, 1]: how strongly the ControlNet holds each pixel's canny edges
    # (the layers' canny strengths painted through their masks); None or all 0: no ControlNet.
    control: np.ndarray | None = None
    steering_schedule: str = DEFAULT_STEERING_SCHEDULE  # see sampler.STEERING_SCHEDULES
    pin_dilation: bool = DEFAULT_PIN_DILATION  # the authors' growing pinned area


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # one (h, w, 3) float32 [0, 1] per seed, in seed order
    prompt: str  # the prompt actually used (missing captions appended)
    warnings: list[str]
    timings: dict[str, float]  # "encode", "sample", "decode" seconds


class Engine:
    """A loaded model, kept warm between generations.

    ``components`` exposes the UNet, VAE, text encoders and tokenizers (textual
    inversion adds tokens through them; nothing here caches text embeddings).
    """

    def __init__(
        self,
        components: ModelComponents,
        options: EngineOptions | None = None,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        """``device`` and ``dtype`` are the resolved forms of ``options.device``/``dtype``."""
        options = options or EngineOptions(model=components.name)
        self.options = options
        self.components = components
        self.model_name = components.name
        self.weights_hash = weights_digest(components)  # before TI adds any token
        self.kind = components.kind
        self.native_resolution = components.native_resolution
        self.device = device
        self.dtype = dtype
        self.scheduler_name = options.scheduler
        self.cpu_offload = options.cpu_offload
        self.max_batch = max(1, max_batch)
        components.scheduler = make_scheduler(options.scheduler, components.scheduler.config)
        self.controlnet: ControlNetModel | None = None
        self.controlnet_name: str | None = None
        self._loras: tuple[tuple[tuple[str, int, int], float], ...] = ()  # fused now
        self._lora_originals: Originals = {}
        self.steering = SteeringState()
        install_processors(
            components.unet, self.steering, attention_slicing=options.attention_slicing
        )
        vae = components.vae
        # SDXL's VAE overflows in fp16 (its config says force_upcast): keep it in fp32.
        upcast = dtype == torch.float16 and self.kind == "sdxl" and vae.config.get("force_upcast")
        self.vae_dtype = torch.float32 if upcast else dtype
        if options.vae_tiling:
            vae.enable_tiling()
            vae.enable_slicing()
        home = torch.device("cpu") if options.cpu_offload else device
        for name, module in components.modules():
            target = self.vae_dtype if name == "vae" else dtype
            if module.dtype != target:  # casting an unchanged model makes diffusers warn
                module.to(dtype=target)
            module.to(home)

    # -- placement ---------------------------------------------------------------------

    @contextmanager
    def on_device(self, *modules: torch.nn.Module) -> Iterator[None]:
        """Run ``modules`` on the device inside the block (with CPU offload they live in RAM
        otherwise). Anything that runs the engine's modules itself, such as textual
        inversion, wraps them in this."""
        if not self.cpu_offload or self.device.type == "cpu":
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- public API --------------------------------------------------------------------

    @property
    def model_identity(self) -> str:
        """The model and the LoRAs fused into it: what learned tokens and caches key on."""
        if not self._loras:
            return str(self.model_name)
        parts = [f"{path}#{size}.{mtime}@{scale:g}" for (path, size, mtime), scale in self._loras]
        return " + ".join([str(self.model_name), *parts])

    def use_controlnet(self, controlnet: ControlNetModel | None, name: str | None = None) -> None:
        """Attach (or with None detach) a canny ControlNet that fits this model."""
        if controlnet is not None:
            check_fits(controlnet, self.components.unet, name or "ControlNet")
            if controlnet.dtype != self.dtype:
                controlnet.to(dtype=self.dtype)
            controlnet.to(torch.device("cpu") if self.cpu_offload else self.device)
        self.controlnet, self.controlnet_name = controlnet, name if controlnet is not None else None

    def use_loras(self, loras: Sequence[LoadedLora]) -> None:
        """Fuse exactly these LoRAs, taking the ones fused before off first.

        Nothing happens when the set is the one already fused; taking LoRAs off restores
        the original weights bit for bit.
        """
        wanted = tuple(lora.key for lora in loras)
        if wanted == self._loras:
            return
        if self._lora_originals:
            unfuse_loras(self.components, self._lora_originals)
            self._lora_originals, self._loras = {}, ()
        if loras:
            self._lora_originals = fuse_loras(self.components, loras)
            self._loras = wanted

    def prompt_reader(self) -> PromptReader:
        """How this model reads a prompt: the render predicts steering with it before sampling."""
        return clip_reader(self.components.tokenizers)

    def insert_tokens(self, prompt: str, tokens: dict[str, str]) -> str:
        """``prompt`` with each learned token before its caption, where steering locates it."""
        return insert_before_captions(self.components.tokenizers, prompt, tokens)

    def working_size(self, size: tuple[int, int], resolution: int | None = None) -> tuple[int, int]:
        """(w, h) multiples of 64 with area about resolution^2 and the document's aspect."""
        width, height = size
        target = resolution or self.native_resolution
        if width <= 0 or height <= 0:
            raise SettingsError(f"image size {width}x{height} is empty")
        scale = target / math.sqrt(width * height)
        return (
            max(64, int(round(width * scale / 64.0)) * 64),
            max(64, int(round(height * scale / 64.0)) * 64),
        )

    @contextmanager
    def record_attention(self, recorder: AttentionRecorder) -> Iterator[None]:
        """Call ``recorder`` with every cross-attention's probabilities (tests, diagnostics)."""
        self.steering.recorder = recorder
        try:
            yield
        finally:
            self.steering.recorder = None

    def generate(
        self,
        request: GenerationRequest,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Harmonize ``request.image`` once per seed. ``cancel()`` True raises Cancelled."""
        result, _, _ = self._run(request, progress, cancel, decode=True)
        return result

    def sample_latents(
        self,
        request: GenerationRequest,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final latents (n, C, h/8, w/8), original latents (1, C, h/8, w/8)), float32, undecoded.

        For diagnostics and tests of the noise map: pixels of strength 0 come back as
        the original latents exactly.
        """
        _, latents, original = self._run(request, progress, cancel, decode=False)
        return latents, original

    def _run(
        self,
        request: GenerationRequest,
        progress: Callable[[int, int], None] | None,
        cancel: Callable[[], bool] | None,
        *,
        decode: bool,
    ) -> tuple[GenerationResult, torch.Tensor, torch.Tensor]:
        _validate(request)
        components = self.components
        timings = {"encode": 0.0, "sample": 0.0, "decode": 0.0}
        height, width = request.image.shape[:2]
        started = time.perf_counter()

        captions = [
            phrase.text if float(np.max(phrase.mask, initial=0.0)) > 0 else None
            for phrase in request.phrases
        ]
        prompt, spans, warnings = locate_captions(components.tokenizers, request.prompt, captions)
        cond, uncond = self._encode_prompts(prompt, request)
        with self.on_device(components.vae):
            original = encode_image(components.vae, request.image, self.device)
        latent_size = (original.shape[2], original.shape[3])
        strength = strength_to_latents(request.strength, latent_size, self.device)
        timings["encode"] = time.perf_counter() - started

        max_strength = float(strength.max())
        probe = make_scheduler(self.scheduler_name, components.scheduler.config)
        steps_run = steps_to_run(probe, request.steps, max_strength)
        if steps_run <= 0:  # nothing may change: hand back the input itself
            return unchanged(request, max_strength, original, prompt, warnings, timings)

        control = self._control_inputs(request, latent_size)
        self._set_steering(request, spans, latent_size)

        def sample(chunk: list[int], on_step: Callable[[], None]) -> torch.Tensor:
            conditioning = self._conditioning(cond, uncond, len(chunk), (height, width))
            with self.on_device(components.unet, *([control.model] if control else [])):
                return denoise(
                    components.unet,
                    make_scheduler(self.scheduler_name, components.scheduler.config),
                    original=original,
                    strength=strength,
                    conditioning=conditioning,
                    seeds=chunk,
                    steps=request.steps,
                    guidance=request.guidance,
                    state=self.steering,
                    on_step=on_step,
                    cancel=cancel,
                    control=control,
                    steering_schedule=request.steering_schedule,
                    pin_dilation=request.pin_dilation,
                )

        images, latents = self.sample_in_batches(
            request.seeds, steps_run, sample, progress, timings, decode=decode
        )
        stacked = torch.cat(latents) if latents else original[:0]
        return GenerationResult(images, prompt, warnings, timings), stacked, original

    def sample_in_batches(
        self,
        seeds: Sequence[int],
        steps_per_batch: int,
        sample: Callable[[list[int], Callable[[], None]], torch.Tensor],
        progress: Callable[[int, int], None] | None,
        timings: dict[str, float],
        *,
        decode: bool,
    ) -> tuple[list[np.ndarray], list[torch.Tensor]]:
        """Run ``sample(seeds, on_step)`` on batches of at most ``max_batch`` seeds (every
        family's loop), counting steps for ``progress`` and decoding each batch unless
        ``decode`` is False: (images, or each batch's latents when not decoding). Steering
        is cleared afterwards, whatever happens."""
        seeds = list(seeds)
        batches = [seeds[i : i + self.max_batch] for i in range(0, len(seeds), self.max_batch)]
        total = steps_per_batch * len(batches)
        done = 0

        def on_step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(min(done, total), total)

        images: list[np.ndarray] = []
        all_latents: list[torch.Tensor] = []
        vae = self.components.vae
        try:
            for batch in batches:
                started = time.perf_counter()
                latents = sample(batch, on_step)
                timings["sample"] += time.perf_counter() - started
                if not decode:
                    all_latents.append(latents)
                    continue
                started = time.perf_counter()
                with self.on_device(vae):
                    images.extend(decode_latents(vae, latents))
                timings["decode"] += time.perf_counter() - started
        finally:
            self.steering.clear()
        return images, all_latents

    # -- helpers -----------------------------------------------------------------------

    def _encode_prompts(
        self, prompt: str, request: GenerationRequest
    ) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
        """The prompt's embeddings, and the negative prompt's when guidance needs them."""
        components = self.components
        with self.on_device(*components.text_encoders):
            cond = encode_prompt(components, prompt, self.device)
            if request.guidance <= 1.0:
                return cond, None
            zeros = (
                components.force_zeros_for_empty_prompt
                and self.kind == "sdxl"
                and not request.negative_prompt.strip()
            )
            return cond, encode_prompt(
                components, request.negative_prompt, self.device, zeros=zeros
            )

    def _conditioning(
        self,
        cond: PromptEmbeddings,
        uncond: PromptEmbeddings | None,
        n: int,
        size: tuple[int, int],
    ) -> Conditioning:
        hidden = cond.hidden.to(self.dtype).repeat(n, 1, 1)
        pooled = cond.pooled.repeat(n, 1) if cond.pooled is not None else None
        if uncond is not None:
            hidden = torch.cat([uncond.hidden.to(self.dtype).repeat(n, 1, 1), hidden])
            if pooled is not None:
                pooled = torch.cat([uncond.pooled.repeat(n, 1), pooled])
        added = None
        if self.kind == "sdxl":
            time_ids = sdxl_time_ids(size, hidden.shape[0], dtype=self.dtype, device=self.device)
            added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids}
        return Conditioning(hidden, added, cond_start=n if uncond is not None else 0)

    def _control_inputs(
        self, request: GenerationRequest, latent_size: tuple[int, int]
    ) -> ControlInputs | None:
        """The ControlNet's edge image and scale map, or None when no pixel asks for it."""
        if request.control is None or float(np.max(request.control, initial=0.0)) <= 0.0:
            return None
        if self.controlnet is None:
            raise SettingsError("canny needs a ControlNet: pass --controlnet (a canny ControlNet)")
        edges = torch.from_numpy(canny_edges(request.image)).permute(2, 0, 1)[None]
        return ControlInputs(
            model=self.controlnet,
            image=edges.to(self.device, self.controlnet.dtype),
            scale=strength_to_latents(request.control, latent_size, self.device),
        )

    def _set_steering(
        self,
        request: GenerationRequest,
        spans: list[Span | None],
        latent_size: tuple[int, int],
    ) -> None:
        masks, weights = [], []
        tokens = self.components.tokenizers[0].model_max_length
        token_phrase = torch.full((tokens,), -1, dtype=torch.long)
        for phrase, span in zip(request.phrases, spans, strict=True):
            if span is None or (phrase.inside == 0 and phrase.outside == 0):
                continue
            index = len(masks)
            masks.append(torch.from_numpy(np.asarray(phrase.mask, dtype=np.float32)))
            weights.append((float(phrase.inside), float(phrase.outside)))
            token_phrase[list(span.positions())] = index
        self.steering.clear()
        self.steering.latent_size = latent_size  # recorders need it even without phrases
        if not masks:
            return
        self.steering.set_phrases(
            torch.stack(masks).clamp(0.0, 1.0).to(self.device),
            torch.tensor(weights, dtype=torch.float32, device=self.device),
            token_phrase.to(self.device),
            latent_size,
        )


def validate_request(request: GenerationRequest) -> None:
    """Check a request's shapes (every engine family does, before any work)."""
    _validate(request)


def unchanged(
    request: GenerationRequest,
    max_strength: float,
    original: torch.Tensor,
    prompt: str,
    warnings: list[str],
    timings: dict[str, float],
) -> tuple[GenerationResult, torch.Tensor, torch.Tensor]:
    """When no step would run (noise 0 everywhere, or too low for the step count), every
    family hands back the input itself, and says why when some noise was asked for."""
    if max_strength > 0:
        warnings.append(too_few_steps(request.steps, max_strength))
    image = np.clip(request.image.astype(np.float32), 0.0, 1.0)
    seeds = len(request.seeds)
    result = GenerationResult([image.copy() for _ in range(seeds)], prompt, warnings, timings)
    return result, original.expand(seeds, -1, -1, -1).clone(), original


def _validate(request: GenerationRequest) -> None:
    """Shapes are the caller's contract; a mismatch is a bug, not a user error."""
    image = request.image
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (h, w, 3), got {image.shape}")
    height, width = image.shape[:2]
    if height % 64 or width % 64:
        raise ValueError(f"image size {width}x{height} must be multiples of 64")
    if request.strength.shape != (height, width):
        raise ValueError(f"strength {request.strength.shape} must be {(height, width)}")
    for phrase in request.phrases:
        if phrase.mask.shape != (height, width):
            raise ValueError(
                f"mask of {phrase.text!r} is {phrase.mask.shape}, not {(height, width)}"
            )
    if request.control is not None and request.control.shape != (height, width):
        raise ValueError(f"control {request.control.shape} must be {(height, width)}")
    if not request.seeds:
        raise ValueError("at least one seed is needed")
    if request.steps < 1:
        raise ValueError("steps must be at least 1")


def load_engine(model: str | EngineOptions, **changes: Any) -> Engine:
    """Load a model (``tiny``, ``tiny-sdxl``, ``tiny-flux``, ``tiny-sd3``, a diffusers folder, a .safetensors file or a
    hub id) onto the best device (CUDA fp16, MPS fp32, CPU fp32) unless told otherwise.

    ``load_engine(options)`` or ``load_engine("tiny", device="cpu", ...)``: the keywords
    are :class:`~psd_collage.settings.EngineOptions` fields.
    """
    if isinstance(model, EngineOptions):
        options = dataclasses.replace(model, **changes)
    else:
        options = EngineOptions(model=model, **changes)
    from .flow_models import flow_family  # Flux / SD3: the flow-matching transformer engine

    family = flow_family(options.model)
    if family is not None:
        from .flow import load_flow_engine

        return load_flow_engine(options, family)
    resolved_device = resolve_device(options.device)
    resolved_dtype = resolve_dtype(options.dtype, resolved_device)
    check_scheduler(options.scheduler)  # an unknown name fails before a long load
    components = load_components(
        options.model, dtype=resolved_dtype, allow_pickle=options.allow_pickle
    )
    return Engine(components, options, device=resolved_device, dtype=resolved_dtype)

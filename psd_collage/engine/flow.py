"""Collage Diffusion on flow-matching transformers (Flux.1, SD3.x).

Per-layer noise becomes a per-pixel *start time* on the flow-matching schedule: a
latent pixel of strength ``s`` is pinned to the original re-noised to the current
sigma (``x = (1 - sigma) x0 + sigma n``, the schedule's own interpolation) until the
step where img2img with strength ``s`` would start, and runs free from then on, as
:mod:`.sampler` does for the UNet families. Pixels of strength 0 end as the original
latents exactly; a uniform strength with steering off is diffusers' own img2img
(FluxImg2ImgPipeline / StableDiffusion3Img2ImgPipeline) step for step. A canny
ControlNet (:mod:`.flow_controlnet`) adds its residuals, times each layer's canny
strength on the token grid, to the transformer's blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..errors import Cancelled, SettingsError
from ..settings import SETTINGS, EngineOptions
from .api import Engine, GenerationRequest, GenerationResult, unchanged, validate_request
from .attention import sigma_weight
from .captions import PromptReader, caption_starts, locate_captions
from .flow_controlnet import (
    FlowControlInputs,
    attach_flow_controlnet,
    check_flow_fits,
    flow_control_inputs,
)
from .flow_models import FlowComponents
from .joint_attention import JointSteeringState, install_joint_processors
from .models import weights_digest
from .sampler import (
    encode_image,
    first_step,
    strength_to_latents,
)

#: The highest VE-equivalent sigma steering is evaluated at (Stable Diffusion's sigma_max):
#: f(sigma) grows without bound as a flow-matching sigma reaches 1.
MAX_STEERING_SIGMA = 14.6


def steering_sigma(flow_sigma: float) -> float:
    """The UNet schedule's sigma with the same signal-to-noise ratio as the flow-matching
    ``flow_sigma`` (x = (1 - s) x0 + s n  <->  x0 + (s / (1 - s)) n), so f(sigma) steers a
    transformer as hard as a UNet at the same noise level."""
    if flow_sigma >= 1.0:
        return MAX_STEERING_SIGMA
    return min(MAX_STEERING_SIGMA, flow_sigma / (1.0 - flow_sigma))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> Flux's (B, H/2 * W/2, 4C) sequence of 2x2 patches, row-major."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``size`` (H, W)."""
    b, _, channels = tokens.shape
    h, w = size
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux's position ids of the image tokens: (H/2 * W/2, 3) rows of (0, row, column)."""
    h, w = size[0] // 2, size[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


@dataclass
class FlowConditioning:
    """The transformer's text inputs for one batch; unconditional rows first when guiding
    (SD3's classifier-free guidance; Flux.1 is guidance-distilled and has none)."""

    hidden: torch.Tensor  # (rows, tokens, D)
    pooled: torch.Tensor  # (rows, P)
    text_ids: torch.Tensor | None  # Flux: (tokens, 3)
    cond_start: int


def set_flow_timesteps(
    scheduler: Any, kind: str, steps: int, latent_size: tuple[int, int], device: torch.device
) -> None:
    """The schedule exactly as the family's diffusers pipeline sets it (Flux: sigmas
    1 .. 1/steps shifted by the image's token count)."""
    config = scheduler.config
    tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
    kwargs: dict[str, Any] = {}
    if kind == "flux":
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if config.get("use_dynamic_shifting"):
        kwargs["mu"] = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15 if kind == "flux" else 1.16),
        )
    retrieve_timesteps(scheduler, steps, device, **kwargs)


def denoise_flow(
    transformer: torch.nn.Module,
    scheduler: Any,
    *,
    kind: str,
    original: torch.Tensor,
    strength: torch.Tensor,
    conditioning: FlowConditioning,
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    state: JointSteeringState,
    on_step: Callable[[], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    control: FlowControlInputs | None = None,
) -> torch.Tensor:
    """Flow-matching Euler with a per-pixel start time; returns float32 latents (n, C, h, w).

    ``original`` (1, C, h, w) float32 latents, ``strength`` (1, 1, h, w) in [0, 1]; the
    scheduler's timesteps are set (:func:`set_flow_timesteps`); ``control``: a ControlNet
    whose residuals, times its scale map, join the transformer's.
    """
    device, n = original.device, len(seeds)
    size = (original.shape[2], original.shape[3])
    start = first_step(steps, float(strength.max()))
    timesteps = scheduler.timesteps[start:]
    scheduler.set_begin_index(start)
    free_from = first_step(steps, strength)  # (1, 1, h, w) schedule index per pixel
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    original = original.expand(n, -1, -1, -1)
    noise = randn_tensor(original.shape, generator=generators, device=device, dtype=torch.float32)
    latents = scheduler.scale_noise(original, timesteps[:1].repeat(n), noise)
    guided = conditioning.cond_start > 0
    state.cond_start = conditioning.cond_start
    dtype = transformer.dtype
    extra: dict[str, Any] = {}
    if kind == "flux":
        extra = {"txt_ids": conditioning.text_ids, "img_ids": image_ids(size, device, dtype)}
        if transformer.config.get("guidance_embeds"):
            extra["guidance"] = torch.full([1], guidance, device=device).expand(n)
    for k, t in enumerate(timesteps):
        if cancel is not None and cancel():
            raise Cancelled()
        index = start + k
        sigma = scheduler.sigmas[index]
        pinned = free_from > index
        if k > 0 and bool(pinned.any()):
            latents = torch.where(pinned, sigma * noise + (1.0 - sigma) * original, latents)
        state.factor = sigma_weight(steering_sigma(float(sigma)))
        model_in = torch.cat([latents, latents]) if guided else latents
        rows = model_in.shape[0]
        flux = kind == "flux"
        tokens = pack_latents(model_in.to(dtype)) if flux else model_in.to(dtype)
        timestep = t.expand(rows).to(dtype) / 1000 if flux else t.expand(rows)
        residuals = (
            control.residuals(tokens, timestep, conditioning.hidden, conditioning.pooled, extra)
            if control is not None
            else {}
        )
        prediction = transformer(
            hidden_states=tokens,
            timestep=timestep,
            encoder_hidden_states=conditioning.hidden,
            pooled_projections=conditioning.pooled,
            return_dict=False,
            **extra,
            **residuals,
        )[0]
        prediction = (unpack_latents(prediction, size) if flux else prediction).float()
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance * (cond - uncond)
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0].float()
        if on_step is not None:
            on_step()
    return torch.where(strength > 0, latents, original)


class FlowEngine(Engine):
    """A loaded Flux or SD3 model, kept warm: the :class:`~.api.Engine` interface (the
    render cannot tell), sampled by :func:`denoise_flow` with joint-attention steering.

    Canny ControlNets for the family (diffusers' FluxControlNetModel / SD3ControlNetModel)
    work as on the UNet families, per layer. Not supported: textual inversion (the learned
    token would live in T5 and CLIP at once), refused with one clear error.
    """

    supports_textual_inversion = False

    def __init__(  # noqa: PLR0913 - the Engine's signature
        self,
        components: FlowComponents,
        options: EngineOptions | None = None,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int = 4,
    ) -> None:
        options = options or EngineOptions(model=components.name)
        self.options = options
        self.components = components  # type: ignore[assignment]
        self.model_name = components.name
        self.weights_hash = weights_digest(components)  # type: ignore[arg-type]
        self.kind = components.kind
        self.native_resolution = components.native_resolution
        self.device, self.dtype = device, dtype
        self.scheduler_name = "flow_euler"
        self.cpu_offload = options.cpu_offload
        self.max_batch = max(1, max_batch)
        self.controlnet, self.controlnet_name = None, None
        self._loras: tuple[tuple[tuple[str, int, int], float], ...] = ()
        self._lora_originals = {}
        self.steering = JointSteeringState()
        install_joint_processors(components.transformer, components.kind, self.steering)
        self.vae_dtype = dtype
        if options.vae_tiling:
            components.vae.enable_tiling()
            components.vae.enable_slicing()
        home = torch.device("cpu") if options.cpu_offload else device
        for _, module in components.modules():
            if module.dtype != dtype:
                module.to(dtype=dtype)
            module.to(home)
        self._pipe = components.pipeline()

    def use_controlnet(self, controlnet: Any, name: str | None = None) -> None:
        """Attach (or with None detach) a canny ControlNet that fits this transformer."""
        if controlnet is not None:
            transformer = self.components.transformer
            check_flow_fits(controlnet, transformer, name or "ControlNet")
            attach_flow_controlnet(controlnet, transformer)
            if controlnet.dtype != self.dtype:
                controlnet.to(dtype=self.dtype)
            controlnet.to(torch.device("cpu") if self.cpu_offload else self.device)
        self.controlnet, self.controlnet_name = controlnet, name if controlnet is not None else None

    def prompt_reader(self) -> PromptReader:
        """Captions are found where this family steers them (Flux: T5; SD3: CLIP and T5);
        the T5 window (less its end token) is what the model reads."""
        t5 = self.components.tokenizers[-1]
        return PromptReader(
            partial(locate_flow_captions, self.components),
            lambda text: len(_token_ids(t5, text)),
            self.components.max_sequence_length - 1,
        )

    def insert_tokens(self, prompt: str, tokens: dict[str, str]) -> str:
        raise SettingsError(
            f"textual inversion ([ti]) is not supported for {self.kind} models: remove the "
            "ti tag or use a Stable Diffusion 1.x/2.x/SDXL model"
        )

    def _run(
        self,
        request: GenerationRequest,
        progress: Callable[[int, int], None] | None,
        cancel: Callable[[], bool] | None,
        *,
        decode: bool,
    ) -> tuple[GenerationResult, torch.Tensor, torch.Tensor]:
        validate_request(request)
        components = self.components
        timings = {"encode": 0.0, "sample": 0.0, "decode": 0.0}
        started = time.perf_counter()
        captions = [
            phrase.text if float(np.max(phrase.mask, initial=0.0)) > 0 else None
            for phrase in request.phrases
        ]
        prompt, positions, warnings = locate_flow_captions(components, request.prompt, captions)
        if self.options.scheduler != SETTINGS["scheduler"].default:
            warnings.append(
                f"--scheduler {self.options.scheduler} does not apply to {self.kind} models, "
                "which sample with their flow-matching Euler schedule"
            )
        cond = self._encode(prompt, request)
        with self.on_device(components.vae):
            original = encode_image(components.vae, request.image, self.device)
        latent_size = (original.shape[2], original.shape[3])
        strength = strength_to_latents(request.strength, latent_size, self.device)
        timings["encode"] = time.perf_counter() - started
        max_strength = float(strength.max())
        if first_step(request.steps, max_strength) >= request.steps:
            return unchanged(request, max_strength, original, prompt, warnings, timings)
        control = self._control_inputs(request)
        self._set_joint_steering(request, positions, latent_size, cond.hidden.shape[1])

        def sample(chunk: list[int], on_step: Callable[[], None]) -> torch.Tensor:
            scheduler = type(components.scheduler).from_config(components.scheduler.config)
            set_flow_timesteps(scheduler, self.kind, request.steps, latent_size, self.device)
            controlnets = [control.model] if control is not None else []
            with self.on_device(components.transformer, *controlnets):
                return denoise_flow(
                    components.transformer,
                    scheduler,
                    kind=self.kind,
                    original=original,
                    strength=strength,
                    conditioning=_repeat(cond, len(chunk)),
                    seeds=chunk,
                    steps=request.steps,
                    guidance=request.guidance,
                    state=self.steering,
                    on_step=on_step,
                    cancel=cancel,
                    control=control,
                )

        steps_run = request.steps - first_step(request.steps, max_strength)
        images, latents = self.sample_in_batches(
            request.seeds, steps_run, sample, progress, timings, decode=decode
        )
        stacked = torch.cat(latents) if latents else original[:0]
        return GenerationResult(images, prompt, warnings, timings), stacked, original

    def _control_inputs(self, request: GenerationRequest) -> FlowControlInputs | None:
        """The ControlNet's encoded edges and scale map, or None when no pixel asks for it."""
        if request.control is None or float(np.max(request.control, initial=0.0)) <= 0.0:
            return None
        if self.controlnet is None:
            raise SettingsError("canny needs a ControlNet: pass --controlnet (a canny ControlNet)")
        components = self.components
        with self.on_device(components.vae):
            return flow_control_inputs(
                self.controlnet,
                components.transformer,
                components.vae,
                request.image,
                request.control,
                self.device,
            )

    def _encode(self, prompt: str, request: GenerationRequest) -> FlowConditioning:
        """The family's text inputs, encoded by its diffusers pipeline's own encode_prompt."""
        components = self.components
        length = components.max_sequence_length
        with self.on_device(*components.text_encoders), torch.no_grad():
            if self.kind == "flux":
                hidden, pooled, text_ids = self._pipe.encode_prompt(
                    prompt=prompt, prompt_2=prompt, device=self.device, max_sequence_length=length
                )
                return FlowConditioning(hidden.to(self.dtype), pooled.to(self.dtype), text_ids, 0)
            guided = request.guidance > 1.0
            hidden, negative, pooled, negative_pooled = self._pipe.encode_prompt(
                prompt=prompt,
                prompt_2=prompt,
                prompt_3=prompt,
                device=self.device,
                do_classifier_free_guidance=guided,
                negative_prompt=request.negative_prompt,
                max_sequence_length=length,
            )
        if not guided:
            return FlowConditioning(hidden.to(self.dtype), pooled.to(self.dtype), None, 0)
        return FlowConditioning(
            torch.cat([negative, hidden]).to(self.dtype),
            torch.cat([negative_pooled, pooled]).to(self.dtype),
            None,
            1,
        )

    def _set_joint_steering(
        self,
        request: GenerationRequest,
        positions: list[list[int] | None],
        latent_size: tuple[int, int],
        tokens: int,
    ) -> None:
        masks, weights = [], []
        token_phrase = torch.full((tokens,), -1, dtype=torch.long)
        for phrase, where in zip(request.phrases, positions, strict=True):
            if not where or (phrase.inside == 0 and phrase.outside == 0):
                continue
            token_phrase[where] = len(masks)
            masks.append(torch.from_numpy(np.asarray(phrase.mask, dtype=np.float32)))
            weights.append((float(phrase.inside), float(phrase.outside)))
        self.steering.clear()
        self.steering.latent_size = latent_size
        self.steering.text_tokens = tokens
        if not masks:
            return
        self.steering.set_phrases(
            torch.stack(masks).clamp(0.0, 1.0).to(self.device),
            torch.tensor(weights, dtype=torch.float32, device=self.device),
            token_phrase.to(self.device),
            latent_size,
        )


def _repeat(cond: FlowConditioning, n: int) -> FlowConditioning:
    """Each row of ``cond`` n times (uncond rows, then cond rows), for n variants."""
    rows = cond.hidden.shape[0]
    hidden = torch.cat([cond.hidden[i : i + 1].repeat(n, 1, 1) for i in range(rows)])
    pooled = torch.cat([cond.pooled[i : i + 1].repeat(n, 1) for i in range(rows)])
    return FlowConditioning(hidden, pooled, cond.text_ids, cond.cond_start * n)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def locate_flow_captions(
    components: FlowComponents, prompt: str, captions: Sequence[str | None]
) -> tuple[str, list[list[int] | None], list[str]]:
    """(prompt with missing captions appended, each caption's positions in the joint text
    sequence or None, warnings).

    Flux steers the T5 tokens (its CLIP gives only a pooled vector); SD3 steers the
    caption in the CLIP part (77 tokens, first) and in the T5 part after it.
    """
    clip = components.tokenizers[0]
    used, clip_spans, clip_warnings = locate_captions(components.tokenizers[:-1], prompt, captions)
    t5 = components.tokenizers[-1]
    window = components.max_sequence_length
    caption_ids = [_token_ids(t5, c) if c and c.strip() else [] for c in captions]
    starts = caption_starts(_token_ids(t5, used), caption_ids)
    offset = clip.model_max_length if components.kind == "sd3" else 0
    positions: list[list[int] | None] = []
    warnings = list(clip_warnings) if components.kind == "sd3" else []
    for caption, ids, start, span in zip(captions, caption_ids, starts, clip_spans, strict=True):
        where = list(span.positions()) if span is not None and components.kind == "sd3" else []
        if ids and (start is None or start + len(ids) > window - 1):  # room for </s>
            warnings.append(
                f"caption {caption!r} is beyond the {window}-token T5 window of the prompt and "
                "is not steered there: shorten the prompt or the captions"
            )
        elif ids:
            where += [offset + start + k for k in range(len(ids))]
        positions.append(where or None)
    return used, positions, warnings


def load_flow_engine(options: EngineOptions, family: str) -> FlowEngine:
    """:func:`~.api.load_engine` for Flux / SD3 models (it dispatches here)."""
    from .flow_models import load_flow_components
    from .models import resolve_device, resolve_dtype

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    automatic = options.dtype in (None, "", "auto")
    if automatic and device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16  # Flux/SD3 activations overflow fp16; bf16 is what they ship in
    components = load_flow_components(
        options.model, family, dtype=dtype, allow_pickle=options.allow_pickle
    )
    return FlowEngine(components, options, device=device, dtype=dtype)

"""Our own sampling loop: SDEdit with a per-pixel strength map, classifier-free guidance.

A latent pixel of strength ``s`` behaves like img2img with strength ``s``: until the
schedule reaches the step where that img2img would start, the pixel is the original
latent re-noised to the current timestep (the "differential diffusion" form of the
paper's per-layer noise); from then on it runs free. Pixels of strength 0 end as the
original latents exactly; pixels of strength 1 start from pure noise, as text-to-image
does. With one strength everywhere and steering off, the loop is diffusers' img2img (or
text-to-image) pipeline step for step (tests/test_engine_equivalence.py). Variants are batched with one generator per seed, so a seed
gives the same image whatever else is in the batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..errors import Cancelled, plural
from .attention import SteeringState, sigma_weight
from .controlnet import ControlInputs


@torch.no_grad()
def encode_posterior(
    vae: AutoencoderKL, image: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w, 3) float [0, 1] -> the VAE posterior's (mean, std), (1, C, h/8, w/8) float32
    (C: the VAE's latent channels), shifted and scaled as the UNet sees latents:
    ``mean + std * noise`` is a sample.

    The one VAE encoder: the sampler starts from the mean, textual inversion samples it.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    pixels = pixels.permute(2, 0, 1)[None].clamp(0.0, 1.0) * 2.0 - 1.0
    dist = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
    shift = vae.config.get("shift_factor") or 0.0
    scale = vae.config.scaling_factor
    return (dist.mean.float() - shift) * scale, dist.std.float() * scale


def encode_image(vae: AutoencoderKL, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(h, w, 3) float [0, 1] -> latents (1, C, h/8, w/8) float32; the posterior mean (deterministic)."""
    return encode_posterior(vae, image, device)[0]


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> list[np.ndarray]:
    """Latents -> one (h, w, 3) float32 [0, 1] image per batch row."""
    shift = vae.config.get("shift_factor") or 0.0
    scaled = latents / vae.config.scaling_factor + shift
    pixels = vae.decode(scaled.to(vae.dtype)).sample
    pixels = (pixels.float() / 2.0 + 0.5).clamp(0.0, 1.0)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32))


def strength_to_latents(
    strength: np.ndarray, latent_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(h, w) strength -> (1, 1, h/8, w/8) float32, area-averaged onto the latent grid."""
    values = torch.from_numpy(np.ascontiguousarray(strength, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(values, latent_size).clamp(0.0, 1.0).to(device)


def first_step(steps: int, strength: float | torch.Tensor) -> int | torch.Tensor:
    """Schedule index where img2img with ``strength`` starts (``steps`` means never)."""
    if isinstance(strength, torch.Tensor):
        return steps - torch.floor(strength * steps + 1e-4).clamp(0, steps).long()
    return steps - min(int(math.floor(strength * steps + 1e-4)), steps)


def steps_to_run(scheduler: SchedulerMixin, steps: int, max_strength: float) -> int:
    """How many UNet evaluations one variant takes (0: the strength map changes nothing)."""
    if first_step(steps, max_strength) >= steps:
        return 0
    scheduler.set_timesteps(steps)
    start = first_step(steps, max_strength) * getattr(scheduler, "order", 1)
    return max(0, len(scheduler.timesteps) - start)


def too_few_steps(steps: int, max_strength: float) -> str:
    """The warning for a request whose noise is too low to reach one sampling step: a
    user who asked for change (noise 0.3 at 2 steps) would otherwise get the input back
    without a word."""
    needed = math.ceil(1.0 / max_strength - 1e-4)
    return (
        f"the highest noise ({max_strength:.2f}) at {plural(steps, 'step')} runs no sampling step, so "
        f"the picture comes back unchanged: use at least {needed} steps or more noise"
    )


#: Where the steering's f(sigma) is evaluated. "sigma": at the step's true sigma (ours);
#: "authors": at ``sigmas[k]`` with k counted from 0 in the shortened img2img loop, as the
#: authors' code does (stronger steering once the maximum noise is below 1).
STEERING_SCHEDULES = ("sigma", "authors")
DEFAULT_STEERING_SCHEDULE = "sigma"
#: The authors grow the pinned (replaced) area by int(4 t / 1000) latent pixels each step.
DEFAULT_PIN_DILATION = False


def dilate_pinned(pinned: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``pinned`` (1, 1, h, w) bool grown by int(4 t / 1000) latent pixels (the authors' rule)."""
    radius = int(4 * float(timestep) / 1000)
    if radius <= 0:
        return pinned
    grown = F.max_pool2d(pinned.float(), 2 * radius + 1, stride=1, padding=radius)
    return grown > 0


def current_sigma(scheduler: SchedulerMixin, index: int, timestep: torch.Tensor) -> float:
    """The scheduler's sigma at ``index``, or sqrt((1 - a) / a) from its alphas."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > index:
        return float(sigmas[index])
    alphas = scheduler.alphas_cumprod
    t = float(timestep)
    low = int(math.floor(t))
    high = min(low + 1, len(alphas) - 1)
    alpha = float(alphas[low]) + (float(alphas[high]) - float(alphas[low])) * (t - low)
    return math.sqrt((1.0 - alpha) / alpha)


def sdxl_time_ids(
    size: tuple[int, int], rows: int, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """SDXL's micro-conditioning, as its pipeline builds it for a full, uncropped image:
    original size, crop top-left (0, 0), target size; one row per batch item."""
    height, width = size
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(rows, 1)


@dataclass
class Conditioning:
    """UNet conditioning for the whole batch, unconditional rows first when guiding."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None
    cond_start: int  # first conditional row


def denoise(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    *,
    original: torch.Tensor,
    strength: torch.Tensor,
    conditioning: Conditioning,
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    state: SteeringState,
    on_step: Callable[[], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    control: ControlInputs | None = None,
    steering_schedule: str = DEFAULT_STEERING_SCHEDULE,
    pin_dilation: bool = DEFAULT_PIN_DILATION,
) -> torch.Tensor:
    """Run the loop for ``len(seeds)`` variants; returns float32 latents (n, C, h, w).

    ``original`` (1, C, h, w) float32 latents (C: the VAE's channels), ``strength`` (1, 1, h, w) in [0, 1];
    ``control``: a ControlNet whose residuals, times its scale map, join the UNet's.
    ``steering_schedule`` and ``pin_dilation``: see :data:`STEERING_SCHEDULES` and
    :func:`dilate_pinned`.
    """
    if steering_schedule not in STEERING_SCHEDULES:
        raise ValueError(f"steering_schedule must be one of {STEERING_SCHEDULES}")
    device = original.device
    n = len(seeds)
    scheduler.set_timesteps(steps, device=device)
    order = getattr(scheduler, "order", 1)
    start = first_step(steps, float(strength.max())) * order
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    free_from = first_step(steps, strength) * order  # (1, 1, h, w) schedule index per pixel
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    original = original.expand(n, -1, -1, -1)
    noise = randn_tensor(original.shape, generator=generators, device=device, dtype=torch.float32)
    latents = scheduler.add_noise(original, noise, timesteps[:1].repeat(n))
    if start == 0:
        # Pixels of strength 1 start from pure noise, as diffusers' text-to-image does:
        # add_noise at the first timestep keeps a trace of the input (sqrt(alpha_bar) ~ 0.07
        # at t = 981) and scales sigma schedulers' noise by sigma, not init_noise_sigma.
        latents = torch.where(free_from == 0, noise * scheduler.init_noise_sigma, latents)
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators
    guided = conditioning.cond_start > 0
    state.cond_start = conditioning.cond_start
    for k, t in enumerate(timesteps):
        if cancel is not None and cancel():
            raise Cancelled()
        index = start + k
        pinned = free_from > index
        if pin_dilation and bool(pinned.any()):
            pinned = dilate_pinned(pinned, t)
        if k > 0 and bool(pinned.any()):
            renoised = scheduler.add_noise(original, noise, t.repeat(n))
            latents = torch.where(pinned, renoised, latents)
        if steering_schedule == "authors":
            state.factor = sigma_weight(current_sigma(scheduler, k, scheduler.timesteps[k]))
        else:
            state.factor = sigma_weight(current_sigma(scheduler, index, t))
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t).to(unet.dtype)
        extra = (
            control.residuals(model_in, t, conditioning.hidden, conditioning.added)
            if control is not None
            else {}
        )
        prediction = unet(
            model_in,
            t,
            encoder_hidden_states=conditioning.hidden,
            added_cond_kwargs=conditioning.added,
            return_dict=False,
            **extra,
        )[0].float()
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance * (cond - uncond)
        latents = scheduler.step(prediction, t, latents, return_dict=False, **step_kwargs)[0]
        latents = latents.float()
        if on_step is not None:
            on_step()
    return torch.where(strength > 0, latents, original)

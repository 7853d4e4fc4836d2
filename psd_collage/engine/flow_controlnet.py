"""Per-layer canny ControlNet on Flux and SD3 (diffusers' FluxControlNetModel /
SD3ControlNetModel), the transformer counterpart of :mod:`.controlnet`.

The collage's canny edges go through the VAE (as diffusers' ControlNet pipelines prepare
their control image) and into the ControlNet; its residuals are per image token (Flux:
2x2 latent patches; SD3: ``patch_size`` patches), so each layer's canny strength, painted
through its visible mask, is area-averaged onto that token grid and multiplies every
block residual before the transformer adds it: a layer with ``canny=0`` gets nothing of
the ControlNet, one with ``canny=1`` all of it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FluxControlNetModel,
    FluxTransformer2DModel,
    ModelMixin,
    SD3ControlNetModel,
)

from ..errors import ModelError
from .controlnet import TINY_CONTROLNET, canny_edges, read_controlnet
from .sampler import encode_image, strength_to_latents

#: The ControlNet class diffusers has for each transformer family.
FLOW_CONTROLNETS: dict[str, type[ModelMixin]] = {
    "flux": FluxControlNetModel,
    "sd3": SD3ControlNetModel,
}
_NAMES = {"flux": "Flux.1", "sd3": "Stable Diffusion 3"}


def transformer_family(transformer: torch.nn.Module) -> str:
    return "flux" if isinstance(transformer, FluxTransformer2DModel) else "sd3"


def build_tiny_flow_controlnet(transformer: torch.nn.Module, seed: int = 0) -> ModelMixin:
    """A random-weight ControlNet shaped for the tiny ``transformer`` (offline,
    deterministic; tests, smoke runs). Its output projections (zero in a fresh ControlNet)
    are random too, so that its residuals really change the picture."""
    config = transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if transformer_family(transformer) == "flux":
            controlnet: Any = FluxControlNetModel.from_transformer(
                transformer,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=config.attention_head_dim,
                num_attention_heads=config.num_attention_heads,
                load_weights_from_transformer=False,
            )
            outputs = [
                *controlnet.controlnet_blocks,
                *controlnet.controlnet_single_blocks,
                controlnet.controlnet_x_embedder,
            ]
        else:
            settings = {**dict(config), "num_layers": 1, "extra_conditioning_channels": 0}
            controlnet = SD3ControlNetModel.from_config(settings)
            outputs = [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]
        for layer in outputs:
            torch.nn.init.normal_(layer.weight, std=0.05)
    if controlnet.dtype != transformer.dtype:
        controlnet.to(dtype=transformer.dtype)
    return controlnet.eval().requires_grad_(False)


def load_flow_controlnet(
    source: str,
    transformer: torch.nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> ModelMixin:
    """``tiny``, a diffusers folder or a hub id, checked to fit ``transformer`` (diffusers
    0.42 reads Flux and SD3 ControlNets only as folders: a single file is one error)."""
    with warnings.catch_warnings():
        # diffusers' own FluxControlNetModel builds the FluxPosEmbed it has deprecated
        # (diffusers 0.42): a FutureWarning on every load that no user can act on
        warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
        if source == TINY_CONTROLNET:
            return build_tiny_flow_controlnet(transformer)
        kind = transformer_family(transformer)
        model = read_controlnet(
            source, FLOW_CONTROLNETS[kind], dtype=dtype, allow_pickle=allow_pickle
        )
    check_flow_fits(model, transformer, source)
    return model.eval().requires_grad_(False)


def check_flow_fits(controlnet: Any, transformer: torch.nn.Module, name: str) -> None:
    """A ControlNet for another family (a UNet one, Flux for SD3, another width) fails
    here in one line, not deep inside the transformer."""
    kind = transformer_family(transformer)
    advice = f"use a canny ControlNet made for {_NAMES[kind]} (a {FLOW_CONTROLNETS[kind].__name__})"
    if not isinstance(controlnet, FLOW_CONTROLNETS[kind]):
        raise ModelError(
            f"ControlNet {name!r} was made for another kind of model than --model (it is a "
            f"{type(controlnet).__name__}, the model a {kind} transformer): {advice}"
        )
    mine, theirs = controlnet.config, transformer.config
    keys = ["in_channels", "joint_attention_dim", "pooled_projection_dim"]
    keys += ["patch_size"] if kind == "sd3" else []
    width = [c.num_attention_heads * c.attention_head_dim for c in (mine, theirs)]
    differ = [key for key in keys if mine.get(key) not in (theirs.get(key), None)]
    if width[0] != width[1]:
        differ.append("width")
    if differ:
        raise ModelError(
            f"ControlNet {name!r} was made for another {kind} model than --model (its "
            f"{', '.join(differ)} differ from the model's): {advice} of the same size"
        )


def attach_flow_controlnet(controlnet: Any, transformer: torch.nn.Module) -> None:
    """What diffusers' SD3 ControlNet pipeline does on construction: a ControlNet without
    its own patch embedding (SD3.5 large's) uses a copy of the transformer's."""
    if controlnet.config.get("use_pos_embed") is False and controlnet.pos_embed is None:
        controlnet.pos_embed = copy.deepcopy(transformer.pos_embed).to(controlnet.dtype)


@dataclass
class FlowControlInputs:
    """What the sampler needs per step: the ControlNet, its VAE-encoded edge image and the
    scale map on the transformer's token grid."""

    model: Any
    kind: str
    cond: torch.Tensor  # Flux: packed latent tokens (or pixels for an XLabs-style hint block)
    scale: torch.Tensor  # (1, tokens, 1) float32, row-major over the token grid

    def residuals(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        hidden: torch.Tensor,
        pooled: torch.Tensor,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """The transformer's extra keyword arguments: the ControlNet's block residuals
        times the scale map. ``hidden_states`` and ``timestep`` as the transformer gets them."""
        model, rows = self.model, hidden_states.shape[0]
        cond = self.cond.expand(rows, *self.cond.shape[1:]).to(model.dtype)
        inputs: dict[str, Any] = {
            "hidden_states": hidden_states.to(model.dtype),
            "controlnet_cond": cond,
            "timestep": timestep,
            "return_dict": False,
        }
        config = model.config
        if self.kind == "flux":
            guidance = extra.get("guidance")
            inputs.update(
                encoder_hidden_states=hidden,
                pooled_projections=pooled,
                txt_ids=extra["txt_ids"],
                img_ids=extra["img_ids"],
                guidance=guidance if config.get("guidance_embeds") else None,
            )
            if config.get("num_mode") is not None:  # a union ControlNet: canny is mode 0
                inputs["controlnet_mode"] = torch.zeros(
                    rows, 1, dtype=torch.long, device=cond.device
                )
            blocks, singles = model(**inputs)
            return {
                "controlnet_block_samples": self._scaled(blocks),
                "controlnet_single_block_samples": self._scaled(singles),
                "controlnet_blocks_repeat": model.input_hint_block is not None,
            }
        # InstantX's SD3 ControlNets were trained with zero pooled projections; SD3.5's
        # large one reads no text (diffusers' pipeline makes the same two choices)
        zeros = config.get("force_zeros_for_pooled_projection")
        inputs.update(
            pooled_projections=torch.zeros_like(pooled) if zeros else pooled,
            encoder_hidden_states=hidden if config.get("joint_attention_dim") else None,
        )
        return {"block_controlnet_hidden_states": self._scaled(model(**inputs)[0])}

    def _scaled(self, samples: Any) -> list[torch.Tensor] | None:
        if samples is None:
            return None
        return [sample * self.scale.to(sample.dtype) for sample in samples]


def flow_control_inputs(
    controlnet: Any,
    transformer: torch.nn.Module,
    vae: AutoencoderKL,
    image: np.ndarray,
    control: np.ndarray,
    device: torch.device,
) -> FlowControlInputs:
    """The canny edges of ``image`` ((H, W, 3) in [0, 1]) as the ControlNet reads them and
    ``control`` ((H, W) canny strengths) on the token grid.

    As in diffusers' FluxControlNetPipeline / StableDiffusion3ControlNetPipeline, the edge
    image is VAE-encoded (the posterior mean here, deterministic) and, for Flux, packed
    into 2x2 patches; a Flux ControlNet with its own hint block (XLabs) reads the pixels.
    """
    from .flow import pack_latents

    kind = transformer_family(transformer)
    edges = canny_edges(image)
    height, width = edges.shape[:2]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = (height // factor, width // factor)
    patch = 2 if kind == "flux" else int(transformer.config.patch_size)
    grid = (latent_size[0] // patch, latent_size[1] // patch)
    scale = strength_to_latents(control, grid, device).flatten(2).transpose(1, 2)
    if kind == "flux" and controlnet.input_hint_block is not None:
        pixels = torch.from_numpy(edges).permute(2, 0, 1)[None] * 2.0 - 1.0
        return FlowControlInputs(controlnet, kind, pixels.to(device), scale)
    with torch.no_grad():
        latents = encode_image(vae, edges, device)
    if kind == "flux":
        return FlowControlInputs(controlnet, kind, pack_latents(latents), scale)
    if controlnet.config.get("force_zeros_for_pooled_projection"):
        # diffusers' pipeline: InstantX's SD3 ControlNets read the latents unshifted
        latents = latents + (vae.config.get("shift_factor") or 0.0) * vae.config.scaling_factor
    return FlowControlInputs(controlnet, kind, latents, scale)

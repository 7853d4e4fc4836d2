"""Per-layer canny ControlNet, the paper's extension.

The authors compute canny edges of the whole collage and hand the ControlNet a
*spatial* conditioning scale: each layer's canny strength painted through its
visible mask. That map multiplies the ControlNet's residuals at every UNet
resolution, so a layer with ``canny=1`` keeps its outlines while a layer with
``canny=0`` is free to change shape. The map itself is built by the render from
the layers' masks (:mod:`psd_collage.masks`); here it is only a (h, w) array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

from ..errors import ModelError
from .models import PICKLE_SUFFIXES, load_from_hub

#: Thresholds of the canny ControlNets' training data (lllyasviel's annotator, the
#: diffusers examples, the authors' code): cv2.Canny(image, 100, 200).
CANNY_LOW, CANNY_HIGH = 100, 200
TINY_CONTROLNET = "tiny"


def canny_edges(image: np.ndarray) -> np.ndarray:
    """(h, w, 3) float [0, 1] -> (h, w, 3) float32 edge image in {0, 1}, the ControlNet's input."""
    import cv2  # opencv-python-headless: only renders with a ControlNet need it

    pixels = np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
    edges = cv2.Canny(pixels, CANNY_LOW, CANNY_HIGH)
    return np.repeat(edges[..., None], 3, axis=2).astype(np.float32) / 255.0


@dataclass
class ControlInputs:
    """What the sampler needs per step: the ControlNet, its edge image, the scale map."""

    model: ControlNetModel
    image: torch.Tensor  # (1, 3, H, W) in [0, 1], the ControlNet's dtype and device
    scale: torch.Tensor  # (1, 1, h, w) float32 at latent size
    _scales: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def scale_at(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The scale map area-averaged to one residual's (h, w), cached per size."""
        cached = self._scales.get(size)
        if cached is None:
            cached = F.adaptive_avg_pool2d(self.scale, size)
            self._scales[size] = cached
        return cached.to(dtype)

    def residuals(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        hidden: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
    ) -> dict[str, object]:
        """The UNet's extra keyword arguments: the ControlNet's residuals times the scale map."""
        image = self.image.expand(sample.shape[0], -1, -1, -1)
        down, mid = self.model(
            sample.to(self.model.dtype),
            timestep,
            encoder_hidden_states=hidden.to(self.model.dtype),
            controlnet_cond=image,
            conditioning_scale=1.0,
            added_cond_kwargs=added,
            return_dict=False,
        )
        scaled = [r * self.scale_at(tuple(r.shape[-2:]), r.dtype) for r in down]
        return {
            "down_block_additional_residuals": scaled,
            "mid_block_additional_residual": mid * self.scale_at(tuple(mid.shape[-2:]), mid.dtype),
        }


def build_tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A random-weight ControlNet shaped for ``unet`` (offline, deterministic; tests, smoke runs).

    A freshly made ControlNet's zero convolutions output nothing; the tiny one's are
    random too, so that its residuals really change the picture.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(8, 8, 16, 16)
        )
        zero_convs = [
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
            controlnet.controlnet_cond_embedding.conv_out,
        ]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.05)
    if controlnet.dtype != unet.dtype:
        controlnet.to(dtype=unet.dtype)
    return controlnet.eval().requires_grad_(False)


def load_controlnet(
    source: str,
    unet: torch.nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> ModelMixin:
    """``tiny``, a diffusers ControlNet folder, a single ``.safetensors`` file or a hub id,
    checked to fit ``unet`` (SD 1.x ControlNets for SD 1.x models, SDXL ones for SDXL;
    Flux and SD3 transformers get theirs from :mod:`.flow_controlnet`)."""
    if not isinstance(unet, UNet2DConditionModel):  # a Flux / SD3 transformer
        from .flow_controlnet import load_flow_controlnet

        return load_flow_controlnet(source, unet, dtype=dtype, allow_pickle=allow_pickle)
    if source == TINY_CONTROLNET:
        return build_tiny_controlnet(unet)
    model = read_controlnet(source, ControlNetModel, dtype=dtype, allow_pickle=allow_pickle)
    check_fits(model, unet, source)
    return model.eval().requires_grad_(False)


def _controlnet_class(config: dict[str, Any], default: type[ModelMixin]) -> type[ModelMixin]:
    """The ControlNet class a folder's config names, so that a ControlNet made for another
    family loads as what it is and the fit check names the mismatch."""
    import diffusers

    found = getattr(diffusers, str(config.get("_class_name", "")), None)
    is_controlnet = isinstance(found, type) and "ControlNet" in found.__name__
    return found if is_controlnet and issubclass(found, ModelMixin) else default


def read_controlnet(
    source: str,
    default_class: type[ModelMixin],
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> ModelMixin:
    """A ControlNet from a diffusers folder, a single file (read as ``default_class``) or a
    hub id; the fit to the model is the caller's check. Every failure is one ModelError."""
    path = Path(source).expanduser()
    safetensors_only = None if allow_pickle else True
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(
            f"{path}: {path.suffix} ControlNets are pickles, which can run code when loaded; use a "
            ".safetensors file or pass --allow-pickle if you trust it"
        )

    def from_pretrained(name: str, local: bool) -> ModelMixin:
        config = default_class.load_config(name, local_files_only=local)
        return _controlnet_class(config, default_class).from_pretrained(
            name, torch_dtype=dtype, use_safetensors=safetensors_only, local_files_only=local
        )

    try:
        if path.is_dir():
            return from_pretrained(str(path), True)
        if path.is_file():
            if default_class.__name__ not in SINGLE_FILE_LOADABLE_CLASSES:  # Flux, SD3
                raise ModelError(
                    f"{path}: diffusers reads this kind of ControlNet ({default_class.__name__}) "
                    "only as a folder: point --controlnet at its diffusers folder "
                    "(config.json and the weights)"
                )
            return default_class.from_single_file(str(path), torch_dtype=dtype)
        if path.suffix or source.startswith((".", "/", "~")):
            raise ModelError(f"ControlNet file or folder {source!r} does not exist")
        return load_from_hub(
            source,
            lambda local: from_pretrained(source, local),
            advice=(
                f"download it once with `huggingface-cli download {source}`, point "
                "--controlnet at a diffusers ControlNet folder, or use --controlnet tiny"
            ),
            what="ControlNet",
        )
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"ControlNet {source!r} could not be loaded ({reason})") from None


def check_fits(controlnet: ControlNetModel, unet: UNet2DConditionModel, name: str) -> None:
    """A ControlNet made for another model family fails here, not deep inside the UNet."""
    if not isinstance(controlnet, ControlNetModel):  # a Flux / SD3 ControlNet
        raise ModelError(
            f"ControlNet {name!r} was made for another kind of model than --model (it is a "
            f"{type(controlnet).__name__}, for a diffusion transformer): use a canny ControlNet "
            "for the same Stable Diffusion version (1.x or SDXL)"
        )
    mine, theirs = controlnet.config, unet.config
    same = (
        mine.in_channels == theirs.in_channels  # latent channels: 4 for SD, 16 for SD3/Flux
        and mine.get("cross_attention_dim") == theirs.get("cross_attention_dim")
        and tuple(mine.block_out_channels) == tuple(theirs.block_out_channels)
        and mine.get("addition_embed_type") == theirs.get("addition_embed_type")
    )
    if not same:
        raise ModelError(
            f"ControlNet {name!r} was made for another kind of model than --model (its "
            f"cross-attention width is {mine.get('cross_attention_dim')}, the model's "
            f"{theirs.get('cross_attention_dim')}; its latent channels {mine.in_channels}, the "
            f"model's {theirs.in_channels}): use a canny ControlNet for the same Stable "
            "Diffusion version (1.x or SDXL)"
        )

"""The ``shapes`` model: architecture, offline tokenizer and the packaged weights folder.

A small latent diffusion model in diffusers' Stable Diffusion 1.x layout (AutoencoderKL
with the usual 8x factor, or 4x with three blocks; CLIPTextModel + CLIPTokenizer over the
world's vocabulary; UNet2DConditionModel), trained on the ``shapes`` world by
:mod:`psd_collage.shapes.train`. The weights ship as package data, so ``--model shapes``
loads offline through the same code path as any local diffusers folder.

The sizes are an :class:`Architecture`: the default is the shipped model (its folder's
configs, which is what ``--model shapes`` loads); :data:`ARCHITECTURES` names the others
``python -m psd_collage.shapes.train --arch NAME`` can train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..engine.models import PACKAGED_MODELS, SD_SCHEDULER_CONFIG
from ..engine.tiny_vocab import build_vocab
from .world import SIZE, VOCABULARY

#: Where the trained weights live (a diffusers folder with a model card).
WEIGHTS_DIR: Path = PACKAGED_MODELS["shapes"]
#: Tokens per prompt: the longest world prompt is 17 tokens; room for textual inversion.
MAX_TOKENS = 32


@dataclass(frozen=True)
class Architecture:
    """Widths and depths of the three trained parts; the defaults are the shipped model."""

    latent_channels: int = 4  # 16 in SD3 and Flux: more colour and edge detail per latent
    vae_blocks: tuple[int, ...] = (16, 32, 64, 64)  # four blocks: the usual 8x factor; three: 4x
    vae_layers: int = 1
    unet_blocks: tuple[int, ...] = (32, 64, 64)
    unet_layers: int = 1
    text_width: int = 64  # also the UNet's cross-attention width
    text_layers: int = 2

    def __post_init__(self) -> None:
        if len(self.vae_blocks) not in (3, 4):
            raise ValueError("the VAE has four blocks (8x factor) or three (4x)")
        if len(self.unet_blocks) not in (3, 4):
            raise ValueError("the UNet has three blocks, or four (the first without attention)")
        if any(width % 8 for width in (*self.vae_blocks, *self.unet_blocks)):
            raise ValueError("block widths must be multiples of 8 (group norm of 8 groups)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def latent_size(self) -> int:
        """Latent pixels per side of the world's canvas: 16 at the 8x factor, 32 at 4x."""
        return SIZE // 2 ** (len(self.vae_blocks) - 1)


#: The shipped model (VAE 0.98 M, UNet 1.49 M, text encoder 0.11 M parameters).
SHIPPED = Architecture()
#: The proposed stronger model (issue 19): 16 latent channels like SD3/Flux, a VAE twice
#: as wide at full resolution, a UNet twice as wide (four times the parameters: 5.9 M),
#: 17 MB in fp16; sized by ``train --probe`` to train in about 100 minutes on 2 cores.
STRONG = Architecture(
    latent_channels=16,
    vae_blocks=(32, 64, 96, 96),
    unet_blocks=(64, 128, 128),
    text_width=96,
)
#: The shipped sizes at a 4x factor: three VAE blocks give 32 x 32 x 4 latents (as many
#: numbers per picture as STRONG's 16 channels at 8x, but twice the resolution), and a
#: UNet block without attention goes first at 32 x 32 (1.6 M parameters, 4.8 MB in all).
X4 = Architecture(vae_blocks=(16, 32, 64), unet_blocks=(32, 32, 64, 64))
ARCHITECTURES: dict[str, Architecture] = {"shipped": SHIPPED, "strong": STRONG, "x4": X4}


def build_tokenizer() -> CLIPTokenizer:
    """A real CLIPTokenizer whose vocabulary makes each world word a single token."""
    vocab, merges = build_vocab(list(VOCABULARY))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_text_encoder(tokenizer: CLIPTokenizer, arch: Architecture = SHIPPED) -> CLIPTextModel:
    """A small CLIP text transformer (shipped: 2 layers, 64 wide)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_width,
            intermediate_size=2 * arch.text_width,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_vae(arch: Architecture = SHIPPED) -> AutoencoderKL:
    """A small AutoencoderKL, shipped with the real 8x factor: 128 px -> 16 x 16 x C latents
    (three blocks: 4x, 32 x 32 x C)."""
    blocks = len(arch.vae_blocks)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=arch.vae_blocks,
        layers_per_block=arch.vae_layers,
        latent_channels=arch.latent_channels,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def build_unet(arch: Architecture = SHIPPED) -> UNet2DConditionModel:
    """Shipped: about 1.5 M parameters, blocks 32/64/64, cross-attention at 16 x 16, 8 x 8
    and 4 x 4. A fourth block goes first, at the full latent size, without attention:
    self-attention over 32 x 32 positions would cost more than the rest of the UNet."""
    down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    if len(arch.unet_blocks) == 4:
        down, up = ("DownBlock2D", *down), (*up, "UpBlock2D")
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_blocks,
        layers_per_block=arch.unet_layers,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=arch.text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_scheduler(noise_shift: float = 1.0) -> EulerAncestralDiscreteScheduler:
    """Stable Diffusion's training noise schedule, sampled with Euler ancestral.

    ``noise_shift`` > 1 divides every step's signal-to-noise ratio by its square, as SD3
    shifts its schedule toward noise: a latent with more channels stays readable under
    more noise. The betas then go into the config, so the exported folder samples (with
    any scheduler built from it) on the schedule it was trained on.
    """
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)
    if noise_shift == 1.0:
        return scheduler
    alphas = scheduler.alphas_cumprod.double()
    snr = alphas / (1 - alphas) / noise_shift**2
    shifted = snr / (1 + snr)
    betas = 1 - shifted / torch.cat([shifted.new_ones(1), shifted[:-1]])
    config = {**SD_SCHEDULER_CONFIG, "trained_betas": betas.tolist()}
    return EulerAncestralDiscreteScheduler.from_config(config)

"""The ``shapes`` model: architecture, offline tokenizer and the packaged weights folder.

A small latent diffusion model in diffusers' Stable Diffusion 1.x layout (AutoencoderKL
with the usual 8x factor, CLIPTextModel + CLIPTokenizer over the world's vocabulary,
UNet2DConditionModel), trained on the ``shapes`` world by
:mod:`psd_collage.shapes.train`. The weights ship as package data, so ``--model shapes``
loads offline through the same code path as any local diffusers folder.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..engine.models import PACKAGED_MODELS, SD_SCHEDULER_CONFIG
from ..engine.tiny_vocab import build_vocab
from .world import SIZE, VOCABULARY

#: Where the trained weights live (a diffusers folder with a model card).
WEIGHTS_DIR: Path = PACKAGED_MODELS["shapes"]
#: Tokens per prompt: the longest world prompt is 17 tokens; room for textual inversion.
MAX_TOKENS = 32
LATENT_SIZE = SIZE // 8


def build_tokenizer() -> CLIPTokenizer:
    """A real CLIPTokenizer whose vocabulary makes each world word a single token."""
    vocab, merges = build_vocab(list(VOCABULARY))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text transformer, 64 wide."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_vae() -> AutoencoderKL:
    """A small AutoencoderKL with the real 8x factor: 128 px -> 16 x 16 x 4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    """About 1.5 M parameters: blocks 32/64/64, cross-attention at 16 x 16, 8 x 8 and 4 x 4."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_scheduler() -> EulerAncestralDiscreteScheduler:
    """Stable Diffusion's training noise schedule, sampled with Euler ancestral."""
    return EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)

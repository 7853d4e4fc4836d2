"""Diffusion transformers sampled by flow matching: Flux.1 and Stable Diffusion 3.x.

Beside :mod:`.models` (the UNet families): the same sources (``tiny-flux`` /
``tiny-sd3`` random weights, a diffusers folder, a single ``.safetensors`` file, a hub
id) give a :class:`FlowComponents`, the parts :mod:`.flow` drives. The family is read
from the model itself (the folder's pipeline class, the single file's layout or
diffusers' checkpoint detection), never from a flag.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors import safe_open
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from ..errors import ModelError, SettingsError
from .catalog import TINY_FLOW_MODELS, flow_family_of
from .models import (
    SINGLE_FILE_LAYOUT,
    checkpoint_type,
    hub_offline,
    hub_reachable,
    load_from_hub,
    load_states,
    tokenizer_from_files,
)
from .tiny_vocab import WORDS, build_tiny_tokenizer

FLOW_KINDS = ("flux", "sd3")
#: diffusers' single-file model types -> family.
_SINGLE_FILE_FAMILY = {
    "flux-dev": "flux",
    "flux-schnell": "flux",
    "flux-fill": "flux",
    "flux-depth": "flux",
    "sd3": "sd3",
    "sd35_large": "sd3",
    "sd35_medium": "sd3",
}
_PIPELINES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
#: The tiny models' T5 window (Flux.1-dev uses 512, schnell and SD3 256).
TINY_T5_TOKENS = 32


@dataclass
class FlowComponents:
    """A Flux or SD3 model: transformer, VAE (16 latent channels), text encoders, tokenizers.

    Flux: CLIP-L (pooled only) and T5. SD3: CLIP-L, CLIP-G and T5. ``max_sequence_length``
    is the T5 window the prompt is encoded with.
    """

    kind: str  # "flux" | "sd3"
    transformer: FluxTransformer2DModel | SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler: FlowMatchEulerDiscreteScheduler
    name: str = ""
    max_sequence_length: int = 256
    force_zeros_for_empty_prompt: bool = False  # the single-file writer records it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name code shared with the UNet families looks for
        (``load_controlnet`` sends it to the Flux/SD3 ControlNets by its type)."""
        return self.transformer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        if self.kind == "sd3":
            return int(self.transformer.config.sample_size) * self.vae_scale_factor
        return int(self.vae.config.sample_size)  # Flux's transformer has no size; its VAE does

    def modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        yield "transformer", self.transformer
        yield "vae", self.vae
        for i, encoder in enumerate(self.text_encoders):
            yield ("text_encoder" if i == 0 else f"text_encoder_{i + 1}"), encoder

    def pipeline(self) -> FluxPipeline | StableDiffusion3Pipeline:
        """The diffusers text-to-image pipeline over these very modules (prompt encoding,
        LoRA loading, saving)."""
        parts: dict[str, Any] = {"transformer": self.transformer, "vae": self.vae}
        for i, (encoder, tokenizer) in enumerate(
            zip(self.text_encoders, self.tokenizers, strict=True)
        ):
            suffix = "" if i == 0 else f"_{i + 1}"
            parts[f"text_encoder{suffix}"] = encoder
            parts[f"tokenizer{suffix}"] = tokenizer
        return _PIPELINES[self.kind](scheduler=self.scheduler, **parts)


# ---------------------------------------------------------------------------
# Tiny random-weight models
# ---------------------------------------------------------------------------


def build_tiny_t5_tokenizer(model_max_length: int = TINY_T5_TOKENS) -> T5Tokenizer:
    """A real (Unigram, sentencepiece-style) T5 tokenizer over the tiny word list: each
    word of :data:`~.tiny_vocab.WORDS` is one ``▁word`` piece, anything else falls back
    to single characters. Offline and deterministic."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word in dict.fromkeys(WORDS):
        pieces.append((f"▁{word}", -1.0))
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-_<>[]/":
        pieces.append((char, -5.0))
        pieces.append((f"▁{char}", -5.0))
    unique = list(dict((piece, score) for piece, score in pieces).items())
    return T5Tokenizer(vocab=unique, extra_ids=0, model_max_length=model_max_length)


def _tiny_t5(tokenizer: T5Tokenizer, width: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_clip(tokenizer: CLIPTokenizer, projection: bool) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_vae(
    kind: str, widths: tuple[int, ...] = (8, 16, 32, 32), groups: int = 8
) -> AutoencoderKL:
    """16 latent channels, 8x down, no quant convs: the Flux / SD3 VAE's shape, narrow
    (the tiny models; the benchmarks widen it)."""
    scale, shift = (0.3611, 0.1159) if kind == "flux" else (1.5305, 0.0609)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=groups,
        sample_size=256,
        scaling_factor=scale,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flow_scheduler(kind: str) -> FlowMatchEulerDiscreteScheduler:
    """The family's flow-matching Euler schedule (Flux: resolution-dependent shift)."""
    if kind == "flux":
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build_tiny_flow_components(kind: str = "flux", seed: int = 0) -> FlowComponents:
    """Small random-weight Flux- or SD3-shaped components, offline and deterministic.

    Flux: 1 double-stream and 1 single-stream block, distilled guidance (dev-like); SD3:
    two joint blocks. Native resolution 256 px. The global RNG is left untouched.
    """
    if kind not in FLOW_KINDS:
        raise SettingsError(f"tiny transformer models come as flux or sd3, not {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tokenizer = build_tiny_tokenizer()
        t5_tokenizer = build_tiny_t5_tokenizer()
        if kind == "flux":
            transformer: torch.nn.Module = FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,  # 16 latent channels in 2x2 patches
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=64,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            )
            encoders = [_tiny_clip(clip_tokenizer, False), _tiny_t5(t5_tokenizer, 64)]
            tokenizers: list[Any] = [clip_tokenizer, t5_tokenizer]
        else:
            transformer = SD3Transformer2DModel(
                sample_size=32,
                patch_size=2,
                in_channels=16,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=64,
                caption_projection_dim=32,
                pooled_projection_dim=64,  # both CLIPs' projections side by side
                out_channels=16,
                pos_embed_max_size=64,
            )
            clip_tokenizer_2 = build_tiny_tokenizer(pad_token="!")
            encoders = [
                _tiny_clip(clip_tokenizer, True),
                _tiny_clip(clip_tokenizer_2, True),
                _tiny_t5(t5_tokenizer, 64),
            ]
            tokenizers = [clip_tokenizer, clip_tokenizer_2, t5_tokenizer]
        vae = tiny_vae(kind)
    for module in [transformer, vae, *encoders]:
        module.eval().requires_grad_(False)
    return FlowComponents(
        kind=kind,
        transformer=transformer,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler=flow_scheduler(kind),
        name=f"tiny-{kind}",
        max_sequence_length=TINY_T5_TOKENS,
    )


# ---------------------------------------------------------------------------
# Telling a flow model from a UNet model, and loading it
# ---------------------------------------------------------------------------


def flow_family(model: str) -> str | None:
    """``flux`` / ``sd3`` when ``model`` names such a model, else None (a UNet model, or
    something the UNet loader explains). Reads only configs and file headers."""
    if model in TINY_FLOW_MODELS:
        return TINY_FLOW_MODELS[model]
    path = Path(model).expanduser()
    if path.is_dir():
        return _index_family(path / "model_index.json")
    if path.is_file():
        return _file_family(path) if path.suffix.lower() == ".safetensors" else None
    weights = path.suffix.lower() in {".safetensors", ".ckpt", ".bin", ".pt", ".pth"}
    if weights or model.startswith((".", "/", "~", "\\")) or model.count("/") != 1:
        return None  # not a hub id ("FLUX.1-dev" is one: its dot is no file suffix)
    index = _hub_index(model)
    if index is None:
        return None  # not on the hub either: the UNet loader reports what to do
    return _index_family(Path(index))


def _hub_index(repo_id: str) -> Path | None:
    """The hub model's model_index.json: from the local cache, else (downloads on and the
    hub reachable) the one small file from the hub."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "model_index.json", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no such repo)
        pass
    if hub_offline() or not hub_reachable():
        return None
    try:
        return Path(hf_hub_download(repo_id, "model_index.json"))
    except Exception:  # noqa: BLE001 - no such repo, gated, no model_index.json ...
        return None


def _index_family(index: Path) -> str | None:
    try:
        return flow_family_of(json.loads(index.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return None


def _file_family(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("psd_collage.layout") == SINGLE_FILE_LAYOUT:
                kind = metadata.get("psd_collage.kind")
                return kind if kind in FLOW_KINDS else None
            return _SINGLE_FILE_FAMILY.get(checkpoint_type(handle))
    except Exception:  # noqa: BLE001 - unreadable: the UNet loader reports it
        return None


def load_flow_components(
    model: str, family: str, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False
) -> FlowComponents:
    """Components of the ``family`` model ``model`` (see :func:`flow_family`)."""
    if model in TINY_FLOW_MODELS:
        components = build_tiny_flow_components(family)
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            pipe = _load_pipeline(family, str(path), dtype, allow_pickle, local=True, what=path)
            components = _from_pipeline(pipe, family, str(path))
        elif path.is_file():
            components = _load_single_file(path, family, dtype)
        else:
            pipe = load_from_hub(
                model,
                lambda local: _load_pipeline(family, model, dtype, allow_pickle, local, None),
                advice=f"download it once with `hf download {model}` or point --model at a "
                "diffusers folder",
                what="model",
            )
            components = _from_pipeline(pipe, family, model)
    for _, module in components.modules():
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return components


def _load_pipeline(
    family: str, source: str, dtype: torch.dtype, allow_pickle: bool, local: bool, what: Any
) -> Any:
    from diffusers.utils import logging as diffusers_logging

    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # one bar per component: noise in a designer's log
    try:
        return _PIPELINES[family].from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
            local_files_only=local,
        )
    except (OSError, ValueError) as error:
        if what is None:
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{what}: cannot load this {family} diffusers folder ({reason})") from None
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()


def _from_pipeline(pipe: Any, family: str, name: str) -> FlowComponents:
    count = 2 if family == "flux" else 3
    suffixes = [""] + [f"_{i}" for i in range(2, count + 1)]
    encoders = [getattr(pipe, f"text_encoder{s}", None) for s in suffixes]
    tokenizers = [getattr(pipe, f"tokenizer{s}", None) for s in suffixes]
    if any(part is None for part in [pipe.transformer, pipe.vae, *encoders, *tokenizers]):
        raise ModelError(
            f"model {name!r} lacks a transformer, VAE, text encoder or tokenizer (SD3 without "
            "its T5 encoder is not supported)"
        )
    for module in [pipe.transformer, pipe.vae, *encoders]:
        module.eval().requires_grad_(False)
    schnell = family == "flux" and not pipe.transformer.config.get("guidance_embeds")
    window = 512 if family == "flux" and not schnell else 256  # what the model was trained with
    return FlowComponents(
        kind=family,
        transformer=pipe.transformer,
        vae=pipe.vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler=pipe.scheduler,
        name=name,
        max_sequence_length=min(window, int(tokenizers[-1].model_max_length)),
    )


def _load_single_file(path: Path, family: str, dtype: torch.dtype) -> FlowComponents:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("psd_collage.layout") == SINGLE_FILE_LAYOUT:
        return _load_own_single_file(path, metadata)
    try:
        pipe = _PIPELINES[family].from_single_file(
            str(path), dtype=dtype, local_files_only=hub_offline()
        )
    except Exception as error:  # noqa: BLE001 - diffusers raises many kinds here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"{path}: this {family} checkpoint cannot be loaded as a whole model ({reason}); "
            "most Flux/SD3 single files hold the transformer only: point --model at a "
            "diffusers folder or hub id of the model instead"
        ) from None
    return _from_pipeline(pipe, family, str(path))


def _load_own_single_file(path: Path, metadata: Mapping[str, str]) -> FlowComponents:
    """A file written by :func:`~.models.save_single_file` from flow components."""
    configs = json.loads(metadata["psd_collage.configs"])
    kind = metadata["psd_collage.kind"]
    state: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            component, _, rest = key.partition(".")
            state.setdefault(component, {})[rest] = handle.get_tensor(key)
    transformer_cls = FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel
    modules: dict[str, torch.nn.Module] = {
        "transformer": transformer_cls.from_config(configs["transformer"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
    }
    names = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if kind == "sd3" else [])
    for name in names:
        config = configs[name]
        if config.get("model_type") == "t5":
            modules[name] = T5EncoderModel(T5Config.from_dict(config))
        elif kind == "sd3":  # both SD3 CLIPs give pooled projections
            modules[name] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config))
        else:
            modules[name] = CLIPTextModel(CLIPTextConfig.from_dict(config))
    load_states(path, modules, state)
    for module in modules.values():
        module.eval().requires_grad_(False)
    tokenizers = [
        tokenizer_from_files(files, cls)
        for files, cls in zip(configs["tokenizers"], _tokenizer_classes(kind), strict=True)
    ]
    return FlowComponents(
        kind=kind,
        transformer=modules.pop("transformer"),
        vae=modules.pop("vae"),
        text_encoders=list(modules.values()),
        tokenizers=tokenizers,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]["config"]),
        name=str(path),
        max_sequence_length=tokenizers[-1].model_max_length,
    )


def _tokenizer_classes(kind: str) -> list[type]:
    return [CLIPTokenizer, T5Tokenizer] if kind == "flux" else [CLIPTokenizer] * 2 + [T5Tokenizer]

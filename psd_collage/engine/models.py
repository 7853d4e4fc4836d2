"""Loading diffusion models: hub id, local diffusers folder, single file, or tiny random weights.

Whatever the source, the result is a :class:`ModelComponents` (UNet, VAE, text
encoders and tokenizers, scheduler) that the sampler drives directly. The
model's kind (``sd1`` / ``sd2`` / ``sdxl``) is read from the weights' configs,
never from a flag. Every user-caused failure becomes a one-line
:class:`~psd_collage.errors.ModelError` that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub.errors import HfHubHTTPError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from ..errors import ModelError, SettingsError
from ..settings import SCHEDULERS
from .catalog import PACKAGED_MODELS, TINY_MODELS, typo_of_known_name
from .tiny_vocab import build_tiny_tokenizer

T = TypeVar("T")
PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth"}

#: ``--scheduler`` names -> (diffusers class, config overrides), from the one list in settings.
SCHEDULER_CLASSES: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    name: (getattr(diffusers, spec.diffusers_class), dict(spec.config))
    for name, spec in SCHEDULERS.items()
}

#: Stable Diffusion's training noise schedule (the tiny models use it too).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
}

#: Layout marker of single ``.safetensors`` files written by :func:`save_single_file`.
SINGLE_FILE_LAYOUT = "psd-collage/components-v1"

_LOAD_ERRORS = (OSError, ValueError, HfHubHTTPError)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelComponents:
    """The parts of a Stable Diffusion model our sampler and textual inversion work with.

    ``text_encoders[i]`` pairs with ``tokenizers[i]`` (two of each for SDXL). To add a
    token, add it to every tokenizer and grow every text encoder's input embeddings.
    """

    kind: str  # "sd1" | "sd2" | "sdxl"
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[CLIPTokenizer]
    scheduler: SchedulerMixin
    name: str = ""
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt means zeros
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        yield "unet", self.unet
        yield "vae", self.vae
        for i, encoder in enumerate(self.text_encoders):
            yield ("text_encoder" if i == 0 else f"text_encoder_{i + 1}"), encoder


def weights_digest(components: ModelComponents) -> str:
    """``sha256:<hex>`` over every weight (name, dtype, shape, bytes) of every module.

    Recorded with each render so a variant can be reproduced with the very same
    weights, whatever the model was called. Costs one pass over the weights, once per
    model load (benchmarks/bench_editing.py; sha256 is the fastest of hashlib's on
    CPUs with SHA extensions, twice blake2b's speed here).
    """
    digest = hashlib.sha256()
    for module_name, module in components.modules():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{module_name}.{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().data)
    return f"sha256:{digest.hexdigest()}"


# ---------------------------------------------------------------------------
# Kind, device, dtype, scheduler
# ---------------------------------------------------------------------------


def detect_kind(unet_config: Mapping[str, Any], has_second_text_encoder: bool) -> str:
    """sd1 / sd2 / sdxl from the UNet config (cross-attention width, added conditioning)."""
    cross = unet_config.get("cross_attention_dim")
    if (
        has_second_text_encoder
        or unet_config.get("addition_embed_type") == "text_time"
        or cross == 2048
    ):
        return "sdxl"
    if cross == 1024:
        return "sd2"
    return "sd1"


def resolve_device(device: str | None) -> torch.device:
    """CUDA if present, else Apple MPS, else CPU; or the device asked for."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingsError(f"unknown device {device!r}: use cuda, cuda:N, mps or cpu") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(
            f"device {device!r} asked for but CUDA is not available: use --device cpu"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(
            f"device {device!r} asked for but MPS is not available: use --device cpu"
        )
    if resolved.type not in ("cuda", "mps", "cpu"):
        raise SettingsError(f"unsupported device {device!r}: use cuda, cuda:N, mps or cpu")
    return resolved


_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on MPS (as diffusers' MPS guide does) and on CPU; or the one asked for."""
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise SettingsError(f"unknown dtype {dtype!r}: use fp16, bf16 or fp32") from None


def check_scheduler(name: str) -> None:
    if name not in SCHEDULER_CLASSES:
        known = ", ".join(SCHEDULER_CLASSES)
        raise SettingsError(f"unknown scheduler {name!r} (known: {known})")


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler of the ``--scheduler`` kind built from the model's scheduler config."""
    check_scheduler(name)
    cls, overrides = SCHEDULER_CLASSES[name]
    return cls.from_config({**dict(config), **overrides})


# ---------------------------------------------------------------------------
# Tiny random-weight models (tests, `--model tiny`)
# ---------------------------------------------------------------------------


def _tiny_text_config(tokenizer: CLIPTokenizer, **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    # Four blocks: the real 8x downsampling, so latent geometry matches Stable Diffusion.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=256,
    )


def build_tiny_components(
    kind: str = "sd1", seed: int = 0, *, latent_channels: int = 4
) -> ModelComponents:
    """Small random-weight SD-1.x- or SDXL-shaped components, offline and deterministic.

    Shapes follow diffusers' own dummy test components; the native resolution is
    256 px (UNet sample size 32 x the VAE's 8x). ``latent_channels``: 4 as in Stable
    Diffusion, 16 as in SD3 and Flux (the engine reads it from the VAE's config). The
    global RNG is left untouched.
    """
    if kind not in ("sd1", "sdxl"):
        raise SettingsError(f"tiny models come as sd1 or sdxl, not {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        if kind == "sd1":
            unet = UNet2DConditionModel(
                sample_size=32,
                in_channels=latent_channels,
                out_channels=latent_channels,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=4,
            )
            vae = _tiny_vae(latent_channels)
            encoders: list[torch.nn.Module] = [CLIPTextModel(_tiny_text_config(tokenizer))]
            tokenizers = [tokenizer]
        else:
            unet = UNet2DConditionModel(
                sample_size=32,
                in_channels=latent_channels,
                out_channels=latent_channels,
                block_out_channels=(32, 64, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 1, 2),
                projection_class_embeddings_input_dim=6 * 8 + 32,  # time ids + pooled text
                cross_attention_dim=64,  # both encoders' hidden states side by side
                norm_num_groups=1,
            )
            vae = _tiny_vae(latent_channels)
            tokenizer_2 = build_tiny_tokenizer(pad_token="!")
            encoders = [
                CLIPTextModel(_tiny_text_config(tokenizer)),
                CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, projection_dim=32)),
            ]
            tokenizers = [tokenizer, tokenizer_2]
    scheduler_cls = EulerDiscreteScheduler if kind == "sdxl" else PNDMScheduler
    scheduler = scheduler_cls.from_config(dict(SD_SCHEDULER_CONFIG, skip_prk_steps=True))
    for module in [unet, vae, *encoders]:
        module.eval().requires_grad_(False)
    return ModelComponents(
        kind=kind,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler=scheduler,
        name="tiny" if kind == "sd1" else "tiny-sdxl",
        force_zeros_for_empty_prompt=kind == "sdxl",
    )


def build_tiny_pipeline(
    kind: str = "sd1", seed: int = 0, *, latent_channels: int = 4
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The tiny components as a diffusers pipeline (to save, or to compare against)."""
    return to_pipeline(build_tiny_components(kind, seed, latent_channels=latent_channels))


def to_pipeline(
    components: ModelComponents,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Wrap components in the matching diffusers text-to-image pipeline (no safety checker)."""
    if components.kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=components.unet,
            scheduler=components.scheduler,
            force_zeros_for_empty_prompt=components.force_zeros_for_empty_prompt,
        )
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        unet=components.unet,
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def from_pipeline(pipe: Any, name: str) -> ModelComponents:
    """Take the components out of a loaded diffusers SD / SDXL pipeline."""
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    encoders = [pipe.text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if text_encoder_2 is not None else [])
    if any(part is None for part in [pipe.unet, pipe.vae, *encoders, *tokenizers]):
        raise ModelError(f"model {name!r} lacks a UNet, VAE, text encoder or tokenizer")
    kind = detect_kind(pipe.unet.config, text_encoder_2 is not None)
    force_zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", kind == "sdxl"))
    return _checked(
        ModelComponents(
            kind=kind,
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            scheduler=pipe.scheduler,
            name=name,
            force_zeros_for_empty_prompt=force_zeros,
        )
    )


def _checked(components: ModelComponents) -> ModelComponents:
    """Refuse models our sampler cannot drive (inpainting UNets, unconditional UNets).

    Any latent channel count works (4 in Stable Diffusion, 16 in SD3 and Flux) as long as
    the UNet denoises exactly the latents the VAE makes.
    """
    config = components.unet.config
    latent = components.vae.config.latent_channels
    if config.in_channels != config.out_channels:
        raise ModelError(
            f"model {components.name!r} has a UNet with {config.in_channels} input and "
            f"{config.out_channels} output channels (an inpainting or special-purpose model): "
            "use a Stable Diffusion 1.x, 2.x or SDXL text-to-image model"
        )
    if config.in_channels != latent:
        raise ModelError(
            f"model {components.name!r} has a UNet for {config.in_channels} latent channels "
            f"but a VAE that makes {latent}: its UNet and VAE do not belong together"
        )
    if not config.get("cross_attention_dim"):
        raise ModelError(f"model {components.name!r} has no text conditioning")
    for module in [components.unet, components.vae, *components.text_encoders]:
        module.eval().requires_grad_(False)
    return components


# ---------------------------------------------------------------------------
# Single files in our own layout (components' state dicts + configs in the header)
# ---------------------------------------------------------------------------


def save_single_file(components: ModelComponents, path: str | Path) -> None:
    """Save components as one ``.safetensors`` file that :func:`load_components` reads offline.

    Layout: tensors are named ``<component>.<diffusers/transformers key>`` (components
    ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``); the header metadata holds
    ``psd_collage.layout`` = :data:`SINGLE_FILE_LAYOUT`, ``psd_collage.kind``, and
    ``psd_collage.configs``: JSON with each component's config, the scheduler config and
    the tokenizers' files, so nothing needs fetching from a hub to rebuild the model.
    """
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, Any] = {}
    for name, module in components.modules():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
        config = module.config
        configs[name] = dict(config) if isinstance(config, Mapping) else config.to_dict()
    configs["scheduler"] = {
        "class": type(components.scheduler).__name__,
        "config": dict(components.scheduler.config),
    }
    tokenizer_files = []
    for tokenizer in components.tokenizers:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            tokenizer_files.append(
                {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}
            )
    configs["tokenizers"] = tokenizer_files
    configs["force_zeros_for_empty_prompt"] = components.force_zeros_for_empty_prompt
    metadata = {
        "format": "pt",
        "psd_collage.layout": SINGLE_FILE_LAYOUT,
        "psd_collage.kind": components.kind,
        "psd_collage.configs": json.dumps(configs, default=_json_default),
    }
    # safetensors refuses tensors that share memory (tied weights): copy only those.
    seen: set[int] = set()
    for key, value in tensors.items():
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            tensors[key] = value.clone()
        seen.add(pointer)
    save_file(tensors, str(path), metadata=metadata)


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def load_states(
    path: Path, modules: Mapping[str, torch.nn.Module], state: Mapping[str, Any]
) -> None:
    """Our single file's weights into modules built from its configs (every family's file):
    a component that does not match its config is one error naming it."""
    for name, module in modules.items():
        try:
            module.load_state_dict(state.get(name, {}), strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise ModelError(
                f"{path}: component {name} does not match its config ({first})"
            ) from None


def tokenizer_from_files(files: Mapping[str, str], cls: Any) -> Any:
    """A tokenizer of class ``cls`` from the files our single file stores as text."""
    with tempfile.TemporaryDirectory() as tmp:
        for file_name, text in files.items():
            (Path(tmp) / Path(file_name).name).write_text(text, encoding="utf-8")
        return cls.from_pretrained(tmp)


def _load_own_single_file(
    path: Path, metadata: Mapping[str, str], dtype: torch.dtype
) -> ModelComponents:
    configs = json.loads(metadata["psd_collage.configs"])
    state: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            component, _, rest = key.partition(".")
            state.setdefault(component, {})[rest] = handle.get_tensor(key)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    encoders: list[torch.nn.Module] = []
    for name in ("text_encoder", "text_encoder_2"):
        if name not in configs:
            continue
        config = CLIPTextConfig.from_dict(configs[name])
        architectures = configs[name].get("architectures") or []
        cls = (
            CLIPTextModelWithProjection
            if "CLIPTextModelWithProjection" in architectures or name == "text_encoder_2"
            else CLIPTextModel
        )
        encoders.append(cls(config))
    modules = {"unet": unet, "vae": vae}
    modules.update(
        {("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): m for i, m in enumerate(encoders)}
    )
    load_states(path, modules, state)
    tokenizers = [tokenizer_from_files(files, CLIPTokenizer) for files in configs["tokenizers"]]
    scheduler_info = configs["scheduler"]
    scheduler_cls = getattr(diffusers, scheduler_info["class"], EulerDiscreteScheduler)
    scheduler = scheduler_cls.from_config(scheduler_info["config"])
    kind = detect_kind(unet.config, len(encoders) > 1)
    for module in modules.values():
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return _checked(
        ModelComponents(
            kind=kind,
            unet=unet,
            vae=vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            scheduler=scheduler,
            name=str(path),
            force_zeros_for_empty_prompt=bool(configs.get("force_zeros_for_empty_prompt")),
        )
    )


class _ShapeView(Mapping):
    """Tensor shapes of a safetensors file, enough for diffusers' model-type detection."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._keys = set(handle.keys())

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        shape = tuple(self._handle.get_slice(key).get_shape())

        class _Shaped:
            pass

        shaped = _Shaped()
        shaped.shape = shape  # type: ignore[attr-defined]
        shaped.ndim = len(shape)  # type: ignore[attr-defined]
        return shaped

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys


_SINGLE_FILE_PIPELINES = {
    "v1": StableDiffusionPipeline,
    "v2": StableDiffusionPipeline,
    "xl_base": StableDiffusionXLPipeline,
}


def _load_single_file(path: Path, dtype: torch.dtype) -> ModelComponents:
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_DEFAULT_PIPELINE_PATHS,
        infer_diffusers_model_type,
        load_single_file_checkpoint,
    )

    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                ours = metadata.get("psd_collage.layout") == SINGLE_FILE_LAYOUT
                model_type = "" if ours else infer_diffusers_model_type(_ShapeView(handle))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelError(f"{path}: not a readable .safetensors file ({error})") from None
        if ours:
            return _load_own_single_file(path, metadata, dtype)
    else:  # a pickle, and the user allowed it
        try:
            checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        except Exception as error:  # noqa: BLE001 - torch.load raises many kinds of error
            raise ModelError(f"{path}: cannot read this checkpoint ({error})") from None
        model_type = infer_diffusers_model_type(checkpoint)
        del checkpoint

    pipeline_class = _SINGLE_FILE_PIPELINES.get(model_type)
    if pipeline_class is None:
        raise ModelError(
            f"{path}: this checkpoint looks like {model_type!r}, not a Stable Diffusion 1.x, 2.x or "
            "SDXL text-to-image model"
        )
    config_repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    offline = _hub_offline()
    try:
        pipe = pipeline_class.from_single_file(
            str(path),
            torch_dtype=dtype,
            local_files_only=offline,
            **({"safety_checker": None} if pipeline_class is StableDiffusionPipeline else {}),
        )
    except _LOAD_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"{path}: a single-file checkpoint needs the diffusers configs and tokenizer of "
            f"{config_repo}, which are not in the local Hugging Face cache ({reason}); fetch them "
            f"once with `hf download {config_repo} --exclude '*.safetensors' '*.bin' "
            "'*.ckpt'`, or point --model at a diffusers folder"
        ) from None
    return from_pipeline(pipe, str(path))


# ---------------------------------------------------------------------------
# Diffusers folders and hub ids
# ---------------------------------------------------------------------------


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look before downloading: huggingface_hub retries an unreachable hub for
    about 30 s, printing every retry, before it gives up."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load_diffusers(
    source: str, dtype: torch.dtype, allow_pickle: bool, local_files_only: bool
) -> ModelComponents:
    """Load a diffusers-layout model component by component (folder or hub id)."""
    common: dict[str, Any] = {"local_files_only": local_files_only}
    index = StableDiffusionPipeline.load_config(source, **common)
    has_second = bool(index.get("text_encoder_2") and index["text_encoder_2"][0] is not None)
    safetensors_only = None if allow_pickle else True
    variants = ["fp16", None] if dtype == torch.float16 else [None, "fp16"]

    def load(cls: Any, subfolder: str, dtype_key: str) -> Any:
        last: Exception | None = None
        for variant in variants:
            try:
                return cls.from_pretrained(
                    source,
                    subfolder=subfolder,
                    variant=variant,
                    use_safetensors=safetensors_only,
                    **{dtype_key: dtype},
                    **common,
                )
            except _LOAD_ERRORS as error:
                last = error
        assert last is not None
        raise last

    unet = load(UNet2DConditionModel, "unet", "torch_dtype")
    vae = load(AutoencoderKL, "vae", "torch_dtype")
    encoders = [load(CLIPTextModel, "text_encoder", "dtype")]
    tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)]
    if has_second:
        encoders.append(load(CLIPTextModelWithProjection, "text_encoder_2", "dtype"))
        tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common))
    scheduler_config = EulerDiscreteScheduler.load_config(source, subfolder="scheduler", **common)
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    kind = detect_kind(unet.config, has_second)
    return _checked(
        ModelComponents(
            kind=kind,
            unet=unet,
            vae=vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            scheduler=scheduler,
            name=source,
            force_zeros_for_empty_prompt=bool(
                index.get("force_zeros_for_empty_prompt", kind == "sdxl")
            ),
        )
    )


def _only_pickle_weights(folder: Path) -> bool:
    has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in folder.rglob("*") if p.is_file())
    has_safe = any(p.suffix == ".safetensors" for p in folder.rglob("*") if p.is_file())
    return has_pickle and not has_safe


def _load_folder(folder: Path, dtype: torch.dtype, allow_pickle: bool) -> ModelComponents:
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"{folder}: not a diffusers model folder (no model_index.json); point --model at a "
            "diffusers folder, a .safetensors file or a Hugging Face model id"
        )
    if not allow_pickle and _only_pickle_weights(folder):
        raise ModelError(
            f"{folder}: this model has only pickle weights (.bin), which can run code when "
            "loaded; convert it to safetensors or pass --allow-pickle if you trust it"
        )
    try:
        return _load_diffusers(str(folder), dtype, allow_pickle, local_files_only=True)
    except _LOAD_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{folder}: cannot load this diffusers folder ({reason})") from None


def _load_hub(repo_id: str, dtype: torch.dtype, allow_pickle: bool) -> ModelComponents:
    with warnings.catch_warnings():
        # diffusers passes a deprecated argument to huggingface_hub on every hub load.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return _load_hub_quietly(repo_id, dtype, allow_pickle)


def _load_hub_quietly(repo_id: str, dtype: torch.dtype, allow_pickle: bool) -> ModelComponents:
    advice = (
        f"download it once with `hf download {repo_id}`, point --model at a "
        "diffusers folder or a .safetensors file, or use --model tiny"
    )
    return load_from_hub(
        repo_id,
        lambda local: _load_diffusers(repo_id, dtype, allow_pickle, local_files_only=local),
        advice=advice,
        what="model",
    )


def load_from_hub(repo_id: str, load: Callable[[bool], T], *, advice: str, what: str) -> T:
    """``load(local_files_only)`` from the local cache first, then from the hub if reachable.

    Models and ControlNets share it: each failure is one ModelError ending in ``advice``.
    """
    try:
        return load(True)
    except _LOAD_ERRORS as error:
        cached_error = error
    if _hub_offline():
        raise ModelError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and downloads are off "
            f"(HF_HUB_OFFLINE): {advice}"
        ) from cached_error
    if not _hub_reachable():
        raise ModelError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached from here: {advice}"
        ) from cached_error
    try:
        return load(False)
    except _LOAD_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"{what} {repo_id!r} could not be loaded from the Hugging Face hub ({reason}): {advice}"
        ) from None


def load_components(
    model: str, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False
) -> ModelComponents:
    """Components for ``model``: ``tiny`` / ``tiny-sdxl``, ``shapes``, a folder, a single file
    or a hub id."""
    if model in TINY_MODELS:
        components = build_tiny_components(TINY_MODELS[model])
        for _, module in components.modules():
            if module.dtype != dtype:
                module.to(dtype=dtype)
        return components
    if model in PACKAGED_MODELS:
        folder = PACKAGED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise ModelError(
                f"the {model!r} model is not in this installation ({folder}); reinstall "
                "psd-collage, or train it with `python -m psd_collage.shapes.train`"
            )
        components = _load_folder(folder, dtype, allow_pickle)
        components.name = model
        return components
    path = Path(model).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        return _load_folder(path, dtype, allow_pickle)
    if path.is_file():
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ModelError(
                f"{path}: {suffix} checkpoints are pickles, which can run code when loaded; use a "
                ".safetensors file or pass --allow-pickle if you trust it"
            )
        if suffix not in PICKLE_SUFFIXES | {".safetensors"}:
            raise ModelError(
                f"{path}: unknown model file type {suffix or '(none)'!r}; use a .safetensors "
                "checkpoint or a diffusers folder"
            )
        return _load_single_file(path, dtype)
    if typo := typo_of_known_name(model):
        raise ModelError(typo)
    looks_like_path = model.startswith((".", "/", "~", "\\")) or model.count("/") > 1
    if suffix in PICKLE_SUFFIXES | {".safetensors"} or looks_like_path:
        raise ModelError(f"model file or folder {model!r} does not exist")
    if not _HUB_ID.match(model):
        raise ModelError(
            f"model {model!r} is neither an existing file or folder nor a Hugging Face model id"
        )
    return _load_hub(model, dtype, allow_pickle)


def hub_offline() -> bool:
    """Whether Hugging Face downloads are off (HF_HUB_OFFLINE, read now)."""
    return _hub_offline()


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers within a few seconds."""
    return _hub_reachable()


def checkpoint_type(handle: Any) -> str:
    """diffusers' model type of an open single-file checkpoint (``v1``, ``xl_base``,
    ``flux-dev``, ``sd3`` ...), read from tensor shapes only."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    return infer_diffusers_model_type(_ShapeView(handle))

"""LoRA: read ``.safetensors`` LoRAs (kohya or diffusers keys), fuse them, take them off again.

diffusers' ``load_lora_weights`` (with peft) converts and injects them; we then fuse
them into the base weights and drop peft's wrappers, so sampling runs at the plain
model's speed. Before fusing, the weights a LoRA touches are copied aside; taking
the LoRAs off puts those copies back, so the model is bit-for-bit what it was
(a warm watcher switching LoRA sets between jobs gives a job the same picture as a
fresh process would).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ModelError
from .flow_models import FlowComponents
from .models import PICKLE_SUFFIXES, ModelComponents, to_pipeline


def _pipeline(components: ModelComponents | FlowComponents):
    """The diffusers pipeline whose LoRA loader reads this family's LoRA formats."""
    return (
        components.pipeline() if isinstance(components, FlowComponents) else to_pipeline(components)
    )


@dataclass(frozen=True, eq=False)
class LoadedLora:
    """A LoRA file read into memory, with the scale to fuse it at."""

    path: str
    identity: tuple[str, int, int]  # see lora_identity
    tensors: dict[str, torch.Tensor]
    scale: float = 1.0

    @property
    def key(self) -> tuple[tuple[str, int, int], float]:
        return self.identity, self.scale


def lora_identity(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime): a LoRA edited on disk is a different LoRA."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        raise ModelError(f"{path}: LoRA file does not exist") from None
    return str(resolved), stat.st_size, stat.st_mtime_ns


def read_lora(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The LoRA's tensors. Pickle files (.bin, .pt, .ckpt) are refused unless allowed."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ModelError(f"{path}: LoRA file does not exist")
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(
                f"{path}: {suffix} LoRAs are pickles, which can run code when loaded; use a "
                ".safetensors LoRA or pass --allow-pickle if you trust it"
            )
        return torch.load(path, map_location="cpu", weights_only=True)
    if suffix != ".safetensors":
        raise ModelError(f"{path}: unknown LoRA file type {suffix or '(none)'!r}; use .safetensors")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelError(f"{path}: not a readable .safetensors file ({error})") from None


#: (component name, module name) -> the module's original (weight, bias).
Originals = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]]


def fuse_loras(
    components: ModelComponents | FlowComponents, loras: Sequence[LoadedLora]
) -> Originals:
    """Fuse the LoRAs into the weights at their scales; returns the weights they replaced."""
    from diffusers.utils import logging as diffusers_logging

    pipe = _pipeline(components)
    names = []
    for i, lora in enumerate(loras):
        name = f"lora{i}"
        try:
            # diffusers logs a warning for each text encoder a LoRA leaves alone: normal here.
            # peft warns that a second adapter joins the first: that is what we ask for.
            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                    pipe.load_lora_weights(dict(lora.tensors), adapter_name=name)
            finally:
                diffusers_logging.set_verbosity(level)
        except (ValueError, KeyError, RuntimeError) as error:
            pipe.unload_lora_weights()
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelError(
                f"{lora.path}: this LoRA does not fit model {components.name!r} ({first}); use a LoRA "
                "made for the same Stable Diffusion version"
            ) from None
        names.append(name)
    originals = _originals(components)
    if not originals:
        pipe.unload_lora_weights()
        raise ModelError(
            f"{loras[0].path}: this LoRA holds no layers that model {components.name!r} has"
        )
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(components=_lora_components(components, pipe), adapter_names=names)
    pipe.unload_lora_weights()  # peft's wrappers go; the fused weights stay
    return originals


def unfuse_loras(components: ModelComponents | FlowComponents, originals: Originals) -> None:
    """Put back the weights :func:`fuse_loras` replaced: exactly the model before it."""
    modules = dict(components.modules())
    with torch.no_grad():
        for (component, name), (weight, bias) in originals.items():
            layer = modules[component].get_submodule(name)
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)


def _lora_components(components: ModelComponents, pipe: object) -> list[str]:
    names = [name for name, _ in components.modules() if name != "vae"]
    # Flux's loader takes no LoRA for its T5 (text_encoder_2) and refuses to fuse one.
    loadable = getattr(pipe, "_lora_loadable_modules", names)
    return [name for name in names if name in loadable]


def _originals(components: ModelComponents) -> Originals:
    """Copies (on the CPU) of the base weights of every layer peft wrapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved: Originals = {}
    for component, model in components.modules():
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
                base = module.get_base_layer()
                bias = getattr(base, "bias", None)
                saved[(component, name)] = (
                    base.weight.detach().to("cpu", copy=True),
                    bias.detach().to("cpu", copy=True) if bias is not None else None,
                )
    return saved


def save_tiny_lora(
    components: ModelComponents | FlowComponents, path: str | Path, *, rank: int = 4, seed: int = 0
) -> Path:
    """A random LoRA for ``components``' UNet or transformer, made offline with peft (tests,
    benchmarks).

    peft initialises LoRA's B matrices to zero (no effect); they are random here so the
    LoRA visibly changes the picture. Saved in diffusers' format with diffusers' writer.
    """
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save

    from ..atomic import atomic_write_bytes

    unet = copy.deepcopy(components.unet)  # the model itself stays free of peft
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name="tiny")
        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                for layer in module.lora_B.values():
                    torch.nn.init.normal_(layer.weight, std=0.5)
    layers = get_peft_model_state_dict(unet, adapter_name="tiny")
    path = Path(path)
    denoiser = "transformer" if isinstance(components, FlowComponents) else "unet"
    _pipeline(components).save_lora_weights(
        path.parent,
        **{f"{denoiser}_lora_layers": layers},
        weight_name=path.name,
        save_function=lambda tensors, target: atomic_write_bytes(
            target, save(tensors, metadata={"format": "pt"})
        ),
    )
    return path

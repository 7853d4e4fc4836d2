"""Flux- and SD3-shaped runs of bench_engine.py: collage sampling / diffusers img2img.

Same random-weight transformer, VAE and text encoders on both sides, same size, steps,
seed and number of denoising steps; diffusers' FluxImg2ImgPipeline /
StableDiffusion3Img2ImgPipeline runs its own copy of the transformer with diffusers'
attention. Ours: 4 steered phrases and a per-pixel noise map. Goal: ratio <= 1.10.

    python benchmarks/bench_engine.py --flux [--json] [--threads N] [--repeats 3]
    python benchmarks/bench_engine.py --sd3
    python benchmarks/bench_engine.py --flux --full   # Flux.1-dev's architecture (GPU)
    python benchmarks/bench_engine.py --sd3 --full    # SD3.5-medium-like widths (GPU)
"""

from __future__ import annotations

import copy
import json
import statistics
from typing import Any

import numpy as np
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
)
from PIL import Image
from timing import interleaved  # beside this script
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from psd_collage.engine.flow import FlowEngine
from psd_collage.engine.flow_models import (
    FlowComponents,
    build_tiny_t5_tokenizer,
    flow_scheduler,
    tiny_vae,
)
from psd_collage.engine.models import resolve_device, resolve_dtype
from psd_collage.engine.sampler import first_step
from psd_collage.engine.tiny_vocab import build_tiny_tokenizer
from psd_collage.settings import EngineOptions

CONFIGS: dict[str, dict[str, Any]] = {
    # Narrow layouts with the real block structure: the transformer dominates on 2 cores.
    "flux": {"heads": 4, "head_dim": 32, "double": 2, "single": 4, "t5": (128, 2), "clip": 64},
    "sd3": {"heads": 4, "head_dim": 32, "double": 4, "single": 0, "t5": (128, 2), "clip": 64},
}
FULL: dict[str, dict[str, Any]] = {
    # Flux.1-dev: 19 double + 38 single blocks, 24 x 128 heads, T5-XXL width
    "flux": {
        "heads": 24,
        "head_dim": 128,
        "double": 19,
        "single": 38,
        "t5": (4096, 2),
        "clip": 768,
    },
    # SD3.5-medium-like: 24 joint blocks, 24 x 64 heads
    "sd3": {"heads": 24, "head_dim": 64, "double": 24, "single": 0, "t5": (4096, 2), "clip": 768},
}
VAE_WIDTHS = {"toy": (32, 64, 64, 64), "full": (128, 256, 512, 512)}


def build(kind: str, config: dict[str, Any], full: bool, seed: int = 0) -> FlowComponents:
    """Random-weight components of the given widths (T5 with only 2 layers: encoding is
    the same on both sides and not what is measured)."""
    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_tiny_t5_tokenizer(128)
    width, layers = config["t5"]
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=width,
            d_kv=64,
            d_ff=2 * width,
            num_layers=layers,
            num_heads=max(1, width // 64),
        )
    )
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=config["clip"],
        intermediate_size=2 * config["clip"],
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=config["clip"],
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    vae = tiny_vae(kind, VAE_WIDTHS["full" if full else "toy"], 32)
    inner = config["heads"] * config["head_dim"]
    if kind == "flux":
        transformer: torch.nn.Module = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=config["double"],
            num_single_layers=config["single"],
            attention_head_dim=config["head_dim"],
            num_attention_heads=config["heads"],
            joint_attention_dim=width,
            pooled_projection_dim=config["clip"],
            guidance_embeds=True,
            axes_dims_rope=_rope_axes(config["head_dim"]),
        )
        encoders = [CLIPTextModel(clip_config), t5]
        tokenizers: list[Any] = [clip_tokenizer, t5_tokenizer]
    else:
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=config["double"],
            attention_head_dim=config["head_dim"],
            num_attention_heads=config["heads"],
            joint_attention_dim=width,
            caption_projection_dim=inner,
            pooled_projection_dim=2 * config["clip"],
            out_channels=16,
            pos_embed_max_size=192,
        )
        encoders = [
            CLIPTextModelWithProjection(clip_config),
            CLIPTextModelWithProjection(clip_config),
            t5,
        ]
        tokenizers = [clip_tokenizer, build_tiny_tokenizer(pad_token="!"), t5_tokenizer]
    for module in [transformer, vae, *encoders]:
        module.eval().requires_grad_(False)
    return FlowComponents(
        kind,
        transformer,
        vae,
        encoders,
        tokenizers,
        flow_scheduler(kind),
        name=f"bench-{kind}",
        max_sequence_length=128,
    )


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux's rotary split of a head (16, 56, 56 for 128), scaled to ``head_dim``."""
    side = (head_dim * 7 // 16) // 2 * 2
    return head_dim - 2 * side, side, side


def make_pipeline(components: FlowComponents, transformer: torch.nn.Module) -> Any:
    parts: dict[str, Any] = {"transformer": transformer, "vae": components.vae}
    for i, (encoder, tokenizer) in enumerate(
        zip(components.text_encoders, components.tokenizers, strict=True)
    ):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts[f"text_encoder{suffix}"] = encoder
        parts[f"tokenizer{suffix}"] = tokenizer
    cls = FluxImg2ImgPipeline if components.kind == "flux" else StableDiffusion3Img2ImgPipeline
    scheduler = type(components.scheduler).from_config(components.scheduler.config)
    return cls(scheduler=scheduler, **parts)


def engines(
    kind: str, config: dict[str, Any], args: Any, device: torch.device, dtype: torch.dtype
) -> tuple[FlowEngine, Any]:
    """Our engine and diffusers' img2img pipeline on the same weights, each with its own
    transformer (the pipeline's keeps diffusers' own attention processors)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # Flux.1's 12 B weights made in bf16, on the GPU
    try:
        with torch.device(device):
            components = build(kind, config, args.full)
    finally:
        torch.set_default_dtype(default)
    pipe_transformer = copy.deepcopy(components.transformer)
    engine = FlowEngine(components, EngineOptions(), device=device, dtype=dtype)
    if pipe_transformer.dtype != dtype:
        pipe_transformer.to(dtype=dtype)
    pipe = make_pipeline(components, pipe_transformer).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        components.transformer.compile()
        pipe_transformer.compile()
    return engine, pipe


def run(args: Any, collage_request: Any) -> None:
    """bench_engine.py --flux / --sd3."""
    kind = "flux" if args.flux else "sd3"
    config = dict((FULL if args.full else CONFIGS)[kind])
    size = args.size or (1024 if args.full else 256)
    steps = args.steps or (28 if args.full else 10)
    device = resolve_device(args.device)
    dtype = resolve_dtype("bf16" if device.type == "cuda" else None, device)
    engine, pipe = engines(kind, config, args, device, dtype)

    seed = 1234
    request = collage_request(size, steps, seed)
    request.guidance = 3.5 if kind == "flux" else 7.0
    runs = steps - int(first_step(steps, float(request.strength.max())))
    # The pipelines start at int(steps - steps * strength): this strength gives the same
    # number of denoising steps as the collage's highest noise.
    strength = (runs - 0.5) / steps
    init = Image.fromarray((request.image * 255).astype(np.uint8))

    def run_img2img() -> None:
        pipe(
            prompt=request.prompt,
            image=init,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=request.guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            height=size,
            width=size,
            max_sequence_length=128,
        )

    def run_collage() -> None:
        engine.generate(request)

    cuda = device.type == "cuda"

    first, img2img, collage = interleaved(run_img2img, run_collage, args.repeats, cuda)
    a, b = (statistics.median(t[0] for t in xs) for xs in (img2img, collage))
    a_cpu, b_cpu = (statistics.median(t[1] for t in xs) for xs in (img2img, collage))
    result = {
        "img2img_s": round(a, 4),
        "collage_s": round(b, 4),
        "ratio": round(b / a, 4),
        "cpu_ratio": round(b_cpu / a_cpu, 4),
        "img2img_peak_mib": round(max(t[2] for t in img2img) / 2**20, 1),
        "collage_peak_mib": round(max(t[2] for t in collage) / 2**20, 1),
        "first_run_s": {k: round(v, 2) for k, v in first.items()},
        "config": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "architecture": kind,
            "size": size,
            "steps": steps,
            "denoising_steps": runs,
            "phrases": len(request.phrases),
            "device": str(device),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "compile": args.compile,
            "repeats": len(img2img),
            "img2img_runs": [round(x[0], 4) for x in img2img],
            "collage_runs": [round(x[0], 4) for x in collage],
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{kind}-shaped transformer ({config['double']} joint + {config['single']} single blocks, "
        f"{config['heads']}x{config['head_dim']} heads), {size}x{size}, {runs} of {steps} steps, "
        f"{len(request.phrases)} phrases, {device} {result['config']['dtype']}, "
        f"median of {len(img2img)}:\n"
        f"  diffusers img2img {a:.3f} s   collage {b:.3f} s   ratio {b / a:.3f} "
        f"(CPU time ratio {b_cpu / a_cpu:.3f}; goal <= 1.10)"
    )

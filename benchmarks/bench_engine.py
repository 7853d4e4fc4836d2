"""How much does collage sampling cost over plain img2img on the same model?

Runs, in one process and interleaved, diffusers' ``StableDiffusionImg2ImgPipeline`` and
our collage sampling (4 steered phrases + a per-pixel noise map) on the same
random-weight SD-1.x-shaped components, with the same resolution, steps, scheduler,
seed and number of denoising steps; prints the medians and their ratio (goal <= 1.05).

    python benchmarks/bench_engine.py [--json] [--threads N] [--repeats 3]
    python benchmarks/bench_engine.py --full     # the real SD 1.5 architecture (GPU)
    python benchmarks/bench_engine.py --full --sdxl               # SDXL's, at 1024 x 1024
    python benchmarks/bench_engine.py --full --compile --channels-last
    python benchmarks/bench_engine.py --flux     # Flux-shaped / --sd3: SD3-shaped (bench_flow.py)

``--compile`` runs both UNets through ``torch.compile`` (the first, untimed run of each
compiles); ``--channels-last`` stores both UNets channels-last. On CUDA the peak memory
of each side is reported too. ``benchmarks/gpu_check.sh`` runs the GPU matrix.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from timing import interleaved  # beside this script
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from psd_collage.engine import Engine, GenerationRequest, SteeredPhrase
from psd_collage.engine.models import (
    SD_SCHEDULER_CONFIG,
    ModelComponents,
    make_scheduler,
    resolve_device,
    resolve_dtype,
)
from psd_collage.engine.sampler import first_step
from psd_collage.engine.tiny_vocab import build_tiny_tokenizer
from psd_collage.masks import strength_map
from psd_collage.settings import EngineOptions

BENCH = {  # SD-1.x layout, narrower: the UNet dominates like in the real model, on 2 CPU cores
    "unet_channels": (64, 128, 256, 256),
    "vae_channels": (32, 64, 64, 64),
    "text_hidden": 256,
    "text_layers": 4,
    "size": 256,
    "steps": 10,
}
FULL = {  # Stable Diffusion 1.5's architecture
    "unet_channels": (320, 640, 1280, 1280),
    "vae_channels": (128, 256, 512, 512),
    "text_hidden": 768,
    "text_layers": 12,
    "size": 512,
    "steps": 50,
}
SDXL_BENCH = {  # SDXL layout, narrower (a CPU check of the SDXL path, not a timing)
    "unet_channels": (32, 64, 128),
    "transformer_layers": (1, 1, 2),
    "head_dims": (2, 4, 8),
    "vae_channels": (32, 64, 64, 64),
    "text_hidden": (64, 128),
    "text_layers": (2, 2),
    "size": 256,
    "steps": 10,
}
SDXL_FULL = {  # Stable Diffusion XL 1.0 base's architecture
    "unet_channels": (320, 640, 1280),
    "transformer_layers": (1, 2, 10),
    "head_dims": (5, 10, 20),
    "vae_channels": (128, 256, 512, 512),
    "text_hidden": (768, 1280),
    "text_layers": (12, 32),
    "size": 1024,
    "steps": 50,
}


def _text_encoder(tokenizer, hidden: int, layers: int, projection: int | None = None):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(config: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=config["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=config["size"],
    )


def build_sdxl(config: dict[str, Any], seed: int = 0) -> ModelComponents:
    """Random weights in SDXL base's layout (two text encoders, time ids, linear projections)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!")
    hidden_1, hidden_2 = config["text_hidden"]
    unet = UNet2DConditionModel(
        sample_size=config["size"] // 8,
        block_out_channels=config["unet_channels"],
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=config["head_dims"],
        transformer_layers_per_block=config["transformer_layers"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + hidden_2,
        cross_attention_dim=hidden_1 + hidden_2,
    )
    encoders = [
        _text_encoder(tokenizer, hidden_1, config["text_layers"][0]),
        _text_encoder(tokenizer_2, hidden_2, config["text_layers"][1], projection=hidden_2),
    ]
    vae = _vae(config)
    scheduler = make_scheduler("euler_ancestral", SD_SCHEDULER_CONFIG)
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return ModelComponents(
        "sdxl",
        unet,
        vae,
        encoders,
        [tokenizer, tokenizer_2],
        scheduler,
        name="bench-sdxl",
        force_zeros_for_empty_prompt=True,
    )


def build(config: dict[str, Any], seed: int = 0) -> ModelComponents:
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    hidden = config["text_hidden"]
    unet = UNet2DConditionModel(
        sample_size=config["size"] // 8,
        block_out_channels=config["unet_channels"],
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=hidden,
        attention_head_dim=8,
    )
    vae = _vae(config)
    encoder = _text_encoder(tokenizer, hidden, config["text_layers"])
    scheduler = make_scheduler("euler_ancestral", SD_SCHEDULER_CONFIG)
    for module in (unet, vae, encoder):
        module.eval().requires_grad_(False)
    return ModelComponents("sd1", unet, vae, [encoder], [tokenizer], scheduler, name="bench")


def collage_request(size: int, steps: int, seed: int) -> GenerationRequest:
    """Four layers (quadrant-ish boxes) with different noise levels, blurred like the render."""
    rng = np.random.default_rng(seed)
    image = rng.random((size, size, 3), dtype=np.float32)
    noise = np.full((size, size), 0.5, np.float32)
    captions = ["red car", "old tree", "blue sky", "stone house"]
    phrases = []
    half = size // 2
    for i, caption in enumerate(captions):
        mask = np.zeros((size, size), np.float32)
        top, left = (i // 2) * half, (i % 2) * half
        mask[top + 8 : top + half - 8, left + 8 : left + half - 8] = 1.0
        noise[mask > 0] = 0.4 + 0.1 * i
        phrases.append(SteeredPhrase(caption, mask, 0.2 + 0.4 * 0.75, 0.9 - 0.5 * 0.25))
    strength = strength_map(noise, (size, size))
    return GenerationRequest(
        image=image,
        strength=strength,
        prompt="a street with a red car, an old tree, blue sky and a stone house",
        phrases=phrases,
        seeds=[seed],
        steps=steps,
        guidance=7.0,
    )


def make_pipeline(components: ModelComponents, unet: UNet2DConditionModel):
    """diffusers' own img2img pipeline over the same weights (its own UNet copy)."""
    scheduler = make_scheduler("euler_ancestral", SD_SCHEDULER_CONFIG)
    if components.kind == "sdxl":
        return StableDiffusionXLImg2ImgPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    return StableDiffusionImg2ImgPipeline(
        vae=components.vae,
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--full", action="store_true", help="real SD 1.5 architecture (GPU)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL's architecture instead")
    parser.add_argument("--flux", action="store_true", help="a Flux-shaped transformer")
    parser.add_argument("--sd3", action="store_true", help="an SD3-shaped transformer")
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    parser.add_argument("--channels-last", action="store_true", help="channels-last UNets")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flux or args.sd3:
        import bench_flow  # beside this script

        bench_flow.run(args, collage_request)
        return
    if args.sdxl:
        config = dict(SDXL_FULL if args.full else SDXL_BENCH)
    else:
        config = dict(FULL if args.full else BENCH)
    config["steps"] = args.steps or config["steps"]
    config["size"] = args.size or config["size"]
    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)

    with torch.device(device):  # random init straight on the GPU: SDXL's 2.6 B weights
        components = build_sdxl(config) if args.sdxl else build(config)
    # The pipeline gets its own UNet copy with diffusers' default (fused SDPA) attention.
    pipe_unet = copy.deepcopy(components.unet)
    pipe_unet.set_attn_processor(AttnProcessor2_0())
    pipe = make_pipeline(components, pipe_unet)
    engine = Engine(
        components, EngineOptions(scheduler="euler_ancestral"), device=device, dtype=dtype
    )
    pipe.to(device)
    if pipe_unet.dtype != dtype:
        pipe_unet.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for unet in (pipe_unet, components.unet):
        if args.channels_last:
            unet.to(memory_format=torch.channels_last)
        if args.compile:
            unet.compile()

    size, steps, seed = config["size"], config["steps"], 1234
    request = collage_request(size, steps, seed)
    # float32 0.7 is 0.69999...: round it so both run the same number of denoising steps.
    strength = round(float(request.strength.max()), 4)
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
        )

    def run_collage() -> None:
        engine.generate(request)

    cuda = device.type == "cuda"

    first, img2img, collage = interleaved(run_img2img, run_collage, args.repeats, cuda)
    report(args, config, device, dtype, strength, request, first, img2img, collage)


def report(args, config, device, dtype, strength, request, first, img2img, collage) -> None:  # noqa: ANN001
    a = statistics.median(t[0] for t in img2img)
    b = statistics.median(t[0] for t in collage)
    a_cpu = statistics.median(t[1] for t in img2img)
    b_cpu = statistics.median(t[1] for t in collage)
    steps = config["steps"]
    result = {
        "img2img_s": round(a, 4),
        "collage_s": round(b, 4),
        "ratio": round(b / a, 4),
        "img2img_cpu_s": round(a_cpu, 4),
        "collage_cpu_s": round(b_cpu, 4),
        "cpu_ratio": round(b_cpu / a_cpu, 4),
        "img2img_peak_mib": round(max(t[2] for t in img2img) / 2**20, 1),
        "collage_peak_mib": round(max(t[2] for t in collage) / 2**20, 1),
        "first_run_s": {k: round(v, 2) for k, v in first.items()},
        "config": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "architecture": "sdxl" if args.sdxl else "sd1",
            "compile": args.compile,
            "channels_last": args.channels_last,
            "denoising_steps": steps - int(first_step(steps, strength)),
            "max_strength": round(strength, 3),
            "phrases": len(request.phrases),
            "scheduler": "euler_ancestral",
            "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "repeats": len(img2img),
            "img2img_runs": [round(x[0], 4) for x in img2img],
            "collage_runs": [round(x[0], 4) for x in collage],
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    c = result["config"]
    size = c["size"]
    print(
        f"{c['architecture']}-shaped UNet {c['unet_channels']}, {size}x{size}, {steps} steps "
        f"({c['denoising_steps']} denoising), {c['phrases']} phrases, {c['device']} {c['dtype']}, "
        f"{c['threads']} threads, compile={c['compile']}, channels_last={c['channels_last']}"
    )
    print(f"img2img pipeline: {a:.3f} s (median of {len(img2img)})")
    print(f"collage sampling: {b:.3f} s (median of {len(collage)})")
    print(f"ratio: {b / a:.3f} (goal <= 1.05); CPU-time ratio {b_cpu / a_cpu:.3f}")
    if device.type == "cuda":
        peaks = f"{result['img2img_peak_mib']} / {result['collage_peak_mib']}"
        print(f"peak GPU memory (img2img / collage): {peaks} MiB")


if __name__ == "__main__":
    main()

"""How much does collage sampling cost over plain img2img on the same model?

Runs, in one process and interleaved, diffusers' ``StableDiffusionImg2ImgPipeline`` and
our collage sampling (4 steered phrases + a per-pixel noise map) on the same
random-weight SD-1.x-shaped components, with the same resolution, steps, scheduler,
seed and number of denoising steps; prints the medians and their ratio (goal <= 1.05).

    python benchmarks/bench_engine.py [--json] [--threads N] [--repeats 3]
    python benchmarks/bench_engine.py --full     # the real SD 1.5 architecture (GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

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
    vae = AutoencoderKL(
        block_out_channels=config["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=config["size"],
    )
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=config["text_layers"],
            num_attention_heads=max(1, hidden // 64),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--full", action="store_true", help="real SD 1.5 architecture (GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = dict(FULL if args.full else BENCH)
    config["steps"] = args.steps or config["steps"]
    config["size"] = args.size or config["size"]
    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)
    pipe, engine = _pipeline_and_engine(build(config), device, dtype)
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

    run_img2img()  # warm-up
    run_collage()
    img2img, collage = [], []
    for _ in range(max(3, args.repeats)):
        img2img.append(_timed(run_img2img, device))
        collage.append(_timed(run_collage, device))
    a = statistics.median(t[0] for t in img2img)
    b = statistics.median(t[0] for t in collage)
    a_cpu = statistics.median(t[1] for t in img2img)
    b_cpu = statistics.median(t[1] for t in collage)
    result = {
        "img2img_s": round(a, 4),
        "collage_s": round(b, 4),
        "ratio": round(b / a, 4),
        "img2img_cpu_s": round(a_cpu, 4),
        "collage_cpu_s": round(b_cpu, 4),
        "cpu_ratio": round(b_cpu / a_cpu, 4),
        "config": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "denoising_steps": steps - int(first_step(steps, strength)),
            "max_strength": round(strength, 3),
            "phrases": len(request.phrases),
            "scheduler": "euler_ancestral",
            "device": str(device),
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
    _print_report(result, size, steps)


def _pipeline_and_engine(components: Any, device: torch.device, dtype: torch.dtype):
    """diffusers' img2img pipeline and our engine over the same weights."""
    # The pipeline gets its own UNet copy with diffusers' default (fused SDPA) attention.
    pipe_unet = copy.deepcopy(components.unet)
    pipe_unet.set_attn_processor(AttnProcessor2_0())
    pipe = StableDiffusionImg2ImgPipeline(
        vae=components.vae,
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        unet=pipe_unet,
        scheduler=make_scheduler("euler_ancestral", SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    engine = Engine(
        components, EngineOptions(scheduler="euler_ancestral"), device=device, dtype=dtype
    )
    pipe.to(device)
    if pipe_unet.dtype != dtype:
        pipe_unet.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, engine


def _timed(fn: Any, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): on a shared CPU box the latter is steadier."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def _print_report(result: dict, size: int, steps: int) -> None:
    a, b = result["img2img_s"], result["collage_s"]
    c = result["config"]
    print(
        f"SD-1.x-shaped UNet {c['unet_channels']}, {size}x{size}, {steps} steps "
        f"({c['denoising_steps']} denoising), {c['phrases']} phrases, {c['device']} {c['dtype']}, "
        f"{c['threads']} threads"
    )
    print(f"img2img pipeline: {a:.3f} s (median of {c['repeats']})")
    print(f"collage sampling: {b:.3f} s (median of {c['repeats']})")
    print(f"ratio: {b / a:.3f} (goal <= 1.05); CPU-time ratio {result['cpu_ratio']:.3f}")


if __name__ == "__main__":
    main()

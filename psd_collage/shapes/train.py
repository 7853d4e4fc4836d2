"""Train the ``shapes`` model on the CPU: ``python -m psd_collage.shapes.train``.

Three stages, each resumable from its checkpoint in ``--work``:

1. the VAE, on crops of freshly drawn world scenes (MSE + L1 + a small KL term), decoding
   the posterior mean;
2. the latent cache: ``--scenes`` scenes encoded once (posterior means) with their prompts;
3. the UNet and the text encoder jointly, on the cached latents (epsilon prediction,
   Stable Diffusion's noise schedule, 10 % caption dropout for classifier-free guidance,
   an EMA of the weights is what ships).

Every batch is a function of ``--seed`` and the step, so a resumed run continues
exactly. ``--probe`` times a few steps of each stage and exits. The loss log is
``WORK/loss.csv``; the export writes the fp16 diffusers folder, the loss curve PNG and
``training.json`` (steps, wall time, final losses) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..atomic import atomic_open, atomic_write_text
from .model import (
    LATENT_SIZE,
    WEIGHTS_DIR,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from .world import draw, random_scenes

CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-6


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_open(path) as fh:
        torch.save(state, fh)


def _log(work: Path, stage: str, step: int, loss: float, elapsed: float) -> None:
    path = work / "loss.csv"
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["stage", "step", "loss", "seconds"])
        writer.writerow([stage, step, f"{loss:.6f}", f"{elapsed:.1f}"])


def _lr(step: int, steps: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _crops(args: argparse.Namespace, step: int) -> torch.Tensor:
    """A VAE batch: random ``--vae-crop`` px crops of freshly drawn scenes (same pixel scale)."""
    seed = args.seed * 1_000_003 + step
    images = draw(random_scenes(args.vae_batch, seed=seed)).images
    rng = np.random.default_rng(seed)
    c = args.vae_crop
    corners = rng.integers(0, images.shape[1] - c + 1, (len(images), 2))
    return _pixels(
        np.stack([im[y : y + c, x : x + c] for im, (y, x) in zip(images, corners, strict=False)])
    )


def train_vae(args: argparse.Namespace, work: Path) -> torch.nn.Module:
    """Stage 1: the autoencoder on drawn scenes."""
    torch.manual_seed(args.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt, start, elapsed = work / "vae.pt", 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
    vae.train()
    bar = tqdm(range(start, args.vae_steps), desc="vae", initial=start, total=args.vae_steps)
    t0 = time.perf_counter() - elapsed
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.vae_steps, args.vae_lr, warmup=50)
        x = _crops(args, step)
        posterior = vae.encode(x).latent_dist
        # The posterior mean, as the engine encodes: a sample's noise (std ~1 at the start,
        # against latents of std ~2.5) kept the decoder blurry for hundreds of steps.
        recon = vae.decode(posterior.mode()).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = loss + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 10 == 0 or step == args.vae_steps - 1:
            _log(work, "vae", step, loss.item(), time.perf_counter() - t0)
        if (step + 1) % args.save_every == 0 or step == args.vae_steps - 1:
            _save(
                ckpt,
                {
                    "model": vae.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "elapsed": time.perf_counter() - t0,
                },
            )
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def cache_latents(args: argparse.Namespace, work: Path, vae: torch.nn.Module) -> dict[str, Any]:
    """Stage 2: encode ``--scenes`` scenes once; set the VAE's scaling factor from them."""
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    tokenizer = build_tokenizer()
    latents, prompts, t0 = [], [], time.perf_counter()
    chunk = 64
    for start in tqdm(range(0, args.scenes, chunk), desc="cache"):
        scenes = random_scenes(min(chunk, args.scenes - start), seed=10_000_019 + start)
        latents.append(vae.encode(_pixels(draw(scenes).images)).latent_dist.mean)
        prompts += [s.prompt for s in scenes]
    stacked = torch.cat(latents)
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    cache = {
        "latents": stacked.half(),
        "ids": ids,
        "empty": empty,
        "scaling_factor": float(1.0 / stacked.std()),
        "seconds": time.perf_counter() - t0,
    }
    _save(path, cache)
    return cache


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def train_unet(args: argparse.Namespace, work: Path, cache: dict[str, Any]) -> tuple[Any, Any]:
    """Stage 3: UNet + text encoder jointly; returns their EMA copies."""
    torch.manual_seed(args.seed + 1)
    tokenizer = build_tokenizer()
    unet, text = build_unet(), build_text_encoder(tokenizer)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    ckpt, start, elapsed = work / "unet.pt", 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for module, key in (
            (unet, "unet"),
            (text, "text"),
            (ema_unet, "ema_unet"),
            (ema_text, "ema_text"),
        ):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod.float()
    latents = cache["latents"].float() * cache["scaling_factor"]
    ids, empty = cache["ids"], cache["empty"]
    unet.train()
    text.train()
    end = args.unet_steps if args.stop_at is None else min(args.stop_at, args.unet_steps)
    bar = tqdm(range(start, end), desc="unet", initial=start, total=args.unet_steps)
    t0 = time.perf_counter() - elapsed
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.unet_steps, args.unet_lr)
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        pick = torch.randint(0, len(latents), (args.batch,), generator=g)
        x0, tok = latents[pick], ids[pick].clone()
        drop = torch.rand(args.batch, generator=g) < CAPTION_DROPOUT
        tok[drop] = empty[0]
        t = torch.randint(0, len(alphas), (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=text(tok)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text, decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 10 == 0 or step == end - 1:
            _log(work, "unet", step, loss.item(), time.perf_counter() - t0)
        if (step + 1) % args.save_every == 0 or step == end - 1:
            _save(
                ckpt,
                {
                    "unet": unet.state_dict(),
                    "text": text.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "elapsed": time.perf_counter() - t0,
                },
            )
    return ema_unet.eval(), ema_text.eval()


def export(
    args: argparse.Namespace, work: Path, vae: Any, cache: dict[str, Any], unet: Any, text: Any
) -> None:
    """Write the fp16 diffusers folder, the loss curve and ``training.json`` into ``--out``."""
    from diffusers import StableDiffusionPipeline

    out = Path(args.out)
    vae.register_to_config(scaling_factor=cache["scaling_factor"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    rows = list(csv.DictReader((work / "loss.csv").open()))
    plot_loss(rows, out / "loss_curve.png")
    final = {
        stage: float(np.mean([float(r["loss"]) for r in rows if r["stage"] == stage][-10:]))
        for stage in ("vae", "unet")
    }
    seconds = {
        stage: max(float(r["seconds"]) for r in rows if r["stage"] == stage)
        for stage in ("vae", "unet")
    }
    unet_done = max(int(r["step"]) for r in rows if r["stage"] == "unet") + 1
    stats = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "vae_batch": args.vae_batch,
        "unet_steps": unet_done,
        "batch": args.batch,
        "scenes": args.scenes,
        "final_loss": final,
        "seconds": {**seconds, "cache": cache["seconds"]},
        "scaling_factor": cache["scaling_factor"],
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "training.json", json.dumps(stats, indent=2) + "\n")


def plot_loss(rows: list[dict[str, str]], path: Path) -> None:
    """The loss curves of both stages (moving average over 10 logged points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    for ax, stage in zip(axes, ("vae", "unet"), strict=True):
        steps = np.array([int(r["step"]) for r in rows if r["stage"] == stage])
        loss = np.array([float(r["loss"]) for r in rows if r["stage"] == stage])
        if len(loss) == 0:
            continue
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid") if len(loss) >= 10 else loss
        ax.plot(steps, loss, alpha=0.3, color="C0")
        ax.plot(steps[len(steps) - len(smooth) :], smooth, color="C0")
        ax.set_yscale("log")
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def probe(args: argparse.Namespace) -> None:
    """Time a few steps of each stage (seconds per step), without writing anything."""
    vae, unet = build_vae(), build_unet()
    text = build_text_encoder(build_tokenizer())
    print(
        f"params: vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
        f"text {sum(p.numel() for p in text.parameters()) / 1e6:.2f}M"
    )
    opt = torch.optim.AdamW(list(vae.parameters()))
    t0 = time.perf_counter()
    for step in range(3):
        x = _pixels(draw(random_scenes(args.vae_batch, seed=step)).images)
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample()).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"vae: {(time.perf_counter() - t0) / 3:.2f} s/step at batch {args.vae_batch}")
    t0 = time.perf_counter()
    with torch.no_grad():
        vae.encode(_pixels(draw(random_scenes(64, seed=0)).images))
    print(f"cache: {(time.perf_counter() - t0) / 64 * 1000:.1f} ms/scene")
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params)
    ids = torch.randint(0, 40, (args.batch, 32))
    t0 = time.perf_counter()
    for _ in range(5):
        x = torch.randn(args.batch, unet.config.in_channels, LATENT_SIZE, LATENT_SIZE)
        t = torch.randint(0, 1000, (args.batch,))
        loss = F.mse_loss(unet(x, t, encoder_hidden_states=text(ids)[0]).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"unet: {(time.perf_counter() - t0) / 5:.2f} s/step at batch {args.batch}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="train_work", help="checkpoints, cache and loss log")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="the diffusers folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=5000)
    parser.add_argument("--vae-crop", type=int, default=64)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--scenes", type=int, default=4096)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--save-every", type=int, default=50)
    # Two threads on an idle 2-core machine; with other jobs on the cores use one (two
    # threads then ran 5-8x slower: torch's workers spin waiting for each other).
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", action="store_true", help="time a few steps and exit")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="end the UNet stage at this step (a checkpoint's step: export it as it is)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        probe(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vae = train_vae(args, work)
    cache = cache_latents(args, work, vae)
    unet, text = train_unet(args, work, cache)
    export(args, work, vae, cache, unet, text)


if __name__ == "__main__":
    main()

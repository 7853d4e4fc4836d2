"""Train the ``shapes`` model: ``python -m psd_collage.shapes.train`` (CPU; ``--device cuda``).

Three stages, each resumable from its checkpoint in ``--work``:

1. the VAE, on crops of freshly drawn world scenes (MSE + L1 + a small KL term, optionally
   an edge term and collages whose objects come from another light), decoding the
   posterior mean;
2. the latent cache: ``--scenes`` scenes encoded once (posterior means) with their prompts
   (optionally a share of them collages, ``--unet-mixed-light``);
3. the UNet and the text encoder jointly, on the cached latents (epsilon prediction,
   Stable Diffusion's noise schedule, 10 % caption dropout for classifier-free guidance,
   an EMA of the weights is what ships).

Every batch is a function of ``--seed`` and the step, so a resumed run continues
exactly (batches are drawn on the CPU whatever ``--device`` trains on). ``--arch``
picks the sizes (:data:`~psd_collage.shapes.model.ARCHITECTURES`; the default is the
shipped model, and with the other defaults the command reproduces
its run). ``--probe`` times a few steps of each stage against the shipped
configuration, projects the full run's wall time and the fp16 package size, and exits. The loss log is
``WORK/loss.csv``; the export writes the fp16 diffusers folder, the loss curve PNG and
``training.json`` (steps, wall time, final losses) into ``--out``. ``--init FOLDER``
fine-tunes an exported model instead: stage 1 keeps its VAE, stage 3 starts from its
UNet and text encoder (a recipe tried in minutes, not the hour a new model takes).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
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
from ..engine.models import resolve_device
from ..errors import SettingsError
from .model import (
    ARCHITECTURES,
    SHIPPED,
    WEIGHTS_DIR,
    Architecture,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from .world import LIGHTS, Scene, draw, draw_collages, random_scenes

CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-6
#: Scenes the probe encodes per timed call of the cache stage.
PROBE_SCENES = 32


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
    """A VAE batch: random ``--vae-crop`` px crops of freshly drawn scenes (same pixel scale);
    a ``--mixed-light`` share of them collages whose objects come from another light."""
    seed = args.seed * 1_000_003 + step
    images = _scene_images(random_scenes(args.vae_batch, seed=seed), args.mixed_light, seed)
    rng = np.random.default_rng(seed)
    c = args.vae_crop
    corners = rng.integers(0, images.shape[1] - c + 1, (len(images), 2))
    return _pixels(
        np.stack([im[y : y + c, x : x + c] for im, (y, x) in zip(images, corners, strict=False)])
    )


def _scene_images(scenes: list[Scene], mixed: float, seed: int) -> np.ndarray:
    """``scenes`` drawn, a ``mixed`` share of them as collages whose objects come from
    another light (the same draw for the VAE's ``--mixed-light`` and the UNet's
    ``--unet-mixed-light``)."""
    if mixed <= 0:
        return draw(scenes).images
    mix = np.random.default_rng([seed, 1])  # apart from the caller's own generators
    lights = [
        str(mix.choice([other for other in LIGHTS if other != s.light]))
        if mix.random() < mixed
        else s.light
        for s in scenes
    ]
    return draw_collages(scenes, lights)


def _edges(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical neighbour differences: where edges are."""
    return images[..., :, 1:] - images[..., :, :-1], images[..., 1:, :] - images[..., :-1, :]


def vae_loss(vae: Any, x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """One VAE batch's loss (training and --probe run this very step)."""
    posterior = vae.encode(x).latent_dist
    # The posterior mean, as the engine encodes: a sample's noise (std ~1 at the start,
    # against latents of std ~2.5) kept the decoder blurry for hundreds of steps.
    recon = vae.decode(posterior.mode()).sample
    loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
    if args.edge_weight > 0:  # blurred edges cost little MSE; their gradients cost more
        (rx, ry), (xx, xy) = _edges(recon), _edges(x)
        loss = loss + args.edge_weight * (F.l1_loss(rx, xx) + F.l1_loss(ry, xy))
    return loss + args.kl_weight * posterior.kl().mean()


def _arch(args: argparse.Namespace) -> Architecture:
    """``--arch`` with the sizes given on the command line instead of its own."""
    sizes = {
        "latent_channels": args.latent_channels,
        "vae_blocks": args.vae_blocks,
        "unet_blocks": args.unet_blocks,
        "unet_layers": args.unet_layers,
        "text_width": args.text_width,
    }
    given = {key: value for key, value in sizes.items() if value is not None}
    return dataclasses.replace(ARCHITECTURES[args.arch], **given)


def _widths(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _share(text: str) -> float:
    """A share of scenes (``--mixed-light``, ``--unet-mixed-light``): 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share from 0 to 1")
    return value


def _model_folder(text: str) -> str:
    """``--init``: an exported diffusers folder, refused before any work when it is not one."""
    if not (Path(text) / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{text} is not an exported model folder (no model_index.json); "
            "pass one written by --out, e.g. psd_collage/shapes/weights"
        )
    return text


def _device(text: str) -> str:
    """``--device``, checked by the engine's own rule, refused before any training."""
    try:
        resolve_device(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _resume(ckpt: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The checkpoint's state, or None; one made for another --arch (or, for the UNet,
    another --noise-shift) is refused."""
    if not ckpt.exists():
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    made_for = state.get("arch", SHIPPED.as_dict())
    if made_for != _arch(args).as_dict():
        raise SystemExit(f"{ckpt}: made for other model sizes than these; use another --work")
    if "unet" in state and state.get("noise_shift", 1.0) != args.noise_shift:
        raise SystemExit(f"{ckpt}: trained with another --noise-shift; use another --work")
    return state


def _init_modules(args: argparse.Namespace, part: str, module: torch.nn.Module) -> Any:
    """Load ``--init``'s ``part`` (its exported fp16 weights, in fp32) into ``module``;
    returns the part's config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    loader = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
    try:
        loaded = loader[part].from_pretrained(Path(args.init) / part, torch_dtype=torch.float32)
        module.load_state_dict(loaded.state_dict())
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(
            f"--init {args.init}: {part} does not load as --arch {args.arch} ({first})"
        ) from None
    return loaded.config


def init_vae(args: argparse.Namespace) -> torch.nn.Module:
    """Stage 1 with ``--init``: the folder's autoencoder as it is (the UNet continues on
    its latents), with the scale its UNet was trained at."""
    vae = build_vae(_arch(args))
    config = _init_modules(args, "vae", vae)
    vae.register_to_config(scaling_factor=float(config.scaling_factor))
    return vae.to(args.device).eval()


def train_vae(args: argparse.Namespace, work: Path) -> torch.nn.Module:
    """Stage 1: the autoencoder on drawn scenes."""
    torch.manual_seed(args.seed)
    vae = build_vae(_arch(args)).to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt, start, elapsed = work / "vae.pt", 0, 0.0
    state = _resume(ckpt, args)
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
    vae.train()
    bar = tqdm(range(start, args.vae_steps), desc="vae", initial=start, total=args.vae_steps)
    t0 = time.perf_counter() - elapsed
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.vae_steps, args.vae_lr, warmup=50)
        loss = vae_loss(vae, _crops(args, step).to(args.device), args)
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
                    "arch": _arch(args).as_dict(),
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
        cache = torch.load(path, map_location="cpu", weights_only=False)
        if cache.get("unet_mixed_light", 0.0) != args.unet_mixed_light:
            raise SystemExit(f"{path}: cached with another --unet-mixed-light; use another --work")
        if cache.get("init") != args.init:
            raise SystemExit(
                f"{path}: cached with another autoencoder (--init); use another --work"
            )
        return cache
    tokenizer = build_tokenizer()
    latents, prompts, t0 = [], [], time.perf_counter()
    chunk = 64
    for start in tqdm(range(0, args.scenes, chunk), desc="cache"):
        seed = 10_000_019 + start
        scenes = random_scenes(min(chunk, args.scenes - start), seed=seed)
        pixels = _pixels(_scene_images(scenes, args.unet_mixed_light, seed)).to(args.device)
        latents.append(vae.encode(pixels).latent_dist.mean.cpu())
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
        # An --init UNet keeps the scale it was trained at; a new one gets unit variance.
        "scaling_factor": float(vae.config.scaling_factor if args.init else 1.0 / stacked.std()),
        "unet_mixed_light": args.unet_mixed_light,
        "init": args.init,
        "seconds": time.perf_counter() - t0,
    }
    _save(path, cache)
    return cache


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def unet_loss(
    unet: Any,
    text: Any,
    x0: torch.Tensor,
    tok: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas: torch.Tensor,
) -> torch.Tensor:
    """Epsilon prediction on one batch (training and --probe run this very step)."""
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = unet(noisy, t, encoder_hidden_states=text(tok)[0]).sample
    return F.mse_loss(pred, noise)


def train_unet(args: argparse.Namespace, work: Path, cache: dict[str, Any]) -> tuple[Any, Any]:
    """Stage 3: UNet + text encoder jointly; returns their EMA copies."""
    torch.manual_seed(args.seed + 1)
    tokenizer = build_tokenizer()
    unet = build_unet(_arch(args)).to(args.device)
    text = build_text_encoder(tokenizer, _arch(args)).to(args.device)
    if args.init:
        _init_modules(args, "unet", unet)
        _init_modules(args, "text_encoder", text)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    ckpt, start, elapsed = work / "unet.pt", 0, 0.0
    state = _resume(ckpt, args)
    if state is not None:
        for module, key in (
            (unet, "unet"),
            (text, "text"),
            (ema_unet, "ema_unet"),
            (ema_text, "ema_text"),
        ):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
    alphas = build_scheduler(args.noise_shift).alphas_cumprod.float().to(args.device)
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
        batch = (x.to(args.device) for x in (x0, tok, t, noise))
        loss = unet_loss(unet, text, *batch, alphas)
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
                    "arch": _arch(args).as_dict(),
                    "noise_shift": args.noise_shift,
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "elapsed": time.perf_counter() - t0,
                },
            )
    return ema_unet.eval().cpu(), ema_text.eval().cpu()


def export(
    args: argparse.Namespace, work: Path, vae: Any, cache: dict[str, Any], unet: Any, text: Any
) -> None:
    """Write the fp16 diffusers folder, the loss curve and ``training.json`` into ``--out``."""
    from diffusers import StableDiffusionPipeline

    out = Path(args.out)
    vae = vae.cpu()
    vae.register_to_config(scaling_factor=cache["scaling_factor"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(args.noise_shift),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    rows = list(csv.DictReader((work / "loss.csv").open()))
    plot_loss(rows, out / "loss_curve.png")
    ran = [stage for stage in ("vae", "unet") if any(r["stage"] == stage for r in rows)]
    final = {
        stage: float(np.mean([float(r["loss"]) for r in rows if r["stage"] == stage][-10:]))
        for stage in ran
    }
    seconds = {
        stage: max(float(r["seconds"]) for r in rows if r["stage"] == stage) for stage in ran
    }
    unet_done = max(int(r["step"]) for r in rows if r["stage"] == "unet") + 1
    stats = {
        "seed": args.seed,
        "arch": {"name": args.arch, **_arch(args).as_dict()},
        "vae_loss": {
            "kl_weight": args.kl_weight,
            "edge_weight": args.edge_weight,
            "mixed_light": args.mixed_light,
        },
        "init": args.init,
        "vae_steps": 0 if args.init else args.vae_steps,
        "vae_batch": args.vae_batch,
        "unet_steps": unet_done,
        "batch": args.batch,
        "noise_shift": args.noise_shift,
        "scenes": args.scenes,
        "unet_mixed_light": args.unet_mixed_light,
        "final_loss": final,
        "seconds": {**seconds, "cache": cache["seconds"]},
        "scaling_factor": cache["scaling_factor"],
        "threads": torch.get_num_threads(),
        "device": args.device,
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


class _Rig:
    """One configuration's modules and optimizers, stepped exactly as training steps them."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        arch, tokenizer = _arch(args), build_tokenizer()
        self.args, self.arch = args, arch
        self.vae = build_vae(arch)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr)
        self.unet, self.text = build_unet(arch), build_text_encoder(tokenizer, arch)
        self.ema = copy.deepcopy(self.unet), copy.deepcopy(self.text)
        self.params = list(self.unet.parameters()) + list(self.text.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=args.unet_lr, weight_decay=1e-2)
        self.alphas = build_scheduler(args.noise_shift).alphas_cumprod.float()
        prompts = [scene.prompt for scene in random_scenes(args.batch, seed=args.seed)]
        self.ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def vae_step(self, step: int) -> None:
        loss = vae_loss(self.vae, _crops(self.args, step), self.args)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()

    @torch.no_grad()
    def cache_step(self, step: int) -> None:
        """Encode :data:`PROBE_SCENES` scenes, as the cache stage does."""
        self.vae.encode(_pixels(draw(random_scenes(PROBE_SCENES, seed=step)).images))

    def unet_step(self, step: int) -> None:
        g = torch.Generator().manual_seed(step)
        size = self.arch.latent_size
        shape = (self.args.batch, self.arch.latent_channels, size, size)
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        t = torch.randint(0, len(self.alphas), (self.args.batch,), generator=g)
        loss = unet_loss(self.unet, self.text, x0, self.ids, t, noise, self.alphas)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        _ema_update(self.ema[0], self.unet, 0.995)
        _ema_update(self.ema[1], self.text, 0.995)

    def fp16_megabytes(self) -> float:
        modules = (self.vae, self.unet, self.text)
        return sum(p.numel() for m in modules for p in m.parameters()) * 2 / 1e6


def _median_seconds(rigs: list[_Rig], work: str, repeats: int) -> list[float]:
    """Seconds per call of ``work`` for each rig, interleaved so that load from other
    jobs on the cores hits every rig alike; one untimed call each first (allocation)."""
    times: list[list[float]] = [[] for _ in rigs]
    for repeat in range(repeats + 1):
        for k, rig in enumerate(rigs):
            t0 = time.perf_counter()
            getattr(rig, work)(repeat)
            if repeat > 0:
                times[k].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def probe(args: argparse.Namespace) -> None:
    """Time each stage's step for ``args`` against the shipped configuration in the same
    run, and project the full run: the shipped run's wall time (``training.json``, idle
    2 cores) times the measured ratio times the step counts. Writes nothing."""
    shipped = json.loads((WEIGHTS_DIR / "training.json").read_text())
    baseline = argparse.Namespace(**{**vars(_parser().parse_args([])), "seed": args.seed})
    rigs = [_Rig(baseline), _Rig(args)]
    for name, rig in (("shipped", rigs[0]), ("proposed", rigs[1])):
        counts = [
            sum(p.numel() for p in m.parameters()) / 1e6 for m in (rig.vae, rig.unet, rig.text)
        ]
        print(
            f"{name}: vae {counts[0]:.2f}M, unet {counts[1]:.2f}M, text {counts[2]:.2f}M "
            f"parameters; fp16 weights {rig.fp16_megabytes():.1f} MB"
        )
    stages = [  # (stage, work, shipped units, proposed units, what a unit is)
        ("vae", "vae_step", shipped["vae_steps"], args.vae_steps, f"steps x {args.vae_batch}"),
        ("cache", "cache_step", shipped["scenes"] / PROBE_SCENES, args.scenes / PROBE_SCENES, ""),
        ("unet", "unet_step", shipped["unet_steps"], args.unet_steps, f"steps x {args.batch}"),
    ]
    print(f"proposed: {_arch(args)}")
    print(f"{'stage':6} {'shipped s':>10} {'proposed s':>10} {'ratio':>6}  projected")
    total = 0.0
    for stage, work, shipped_units, units, unit in stages:
        base, mine = _median_seconds(rigs, work, args.probe_steps)
        per_unit = shipped["seconds"][stage] / shipped_units  # idle 2 cores, measured
        projected = per_unit * (mine / base) * units
        total += projected
        print(
            f"{stage:6} {base:10.3f} {mine:10.3f} {mine / base:5.2f}x  "
            f"{projected / 60:6.1f} min ({int(units) if unit else args.scenes} {unit or 'scenes'})"
        )
    print(
        f"total projected: {total / 60:.0f} min on an idle 2-core CPU "
        f"(shipped run: {sum(shipped['seconds'].values()) / 60:.0f} min)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="train_work", help="checkpoints, cache and loss log")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="the diffusers folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=5000)
    parser.add_argument("--vae-crop", type=int, default=64)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="shipped")
    parser.add_argument(
        "--init",
        type=_model_folder,
        metavar="FOLDER",
        help="fine-tune an exported model of these sizes (e.g. psd_collage/shapes/weights): "
        "its autoencoder is kept, its UNet and text encoder train on from their weights",
    )
    parser.add_argument("--latent-channels", type=int, help="instead of the --arch's")
    parser.add_argument(
        "--vae-blocks", type=_widths, help="four widths (8x factor, e.g. 32,64,96,96) or three (4x)"
    )
    parser.add_argument(
        "--unet-blocks",
        type=_widths,
        help="three widths, e.g. 64,128,128, or four (the first without attention)",
    )
    parser.add_argument("--unet-layers", type=int, help="layers per UNet block")
    parser.add_argument("--text-width", type=int, help="text encoder (cross-attention) width")
    parser.add_argument("--kl-weight", type=float, default=KL_WEIGHT)
    parser.add_argument(
        "--noise-shift",
        type=_positive,
        default=1.0,
        help="divide the noise schedule's signal-to-noise ratio by its square (SD3's shift)",
    )
    parser.add_argument(
        "--edge-weight", type=float, default=0.0, help="L1 on neighbour differences (edges)"
    )
    parser.add_argument(
        "--mixed-light",
        type=_share,
        default=0.0,
        help="share of VAE scenes whose objects come from another light (collages)",
    )
    parser.add_argument(
        "--unet-mixed-light",
        type=_share,
        default=0.0,
        help="share of the UNet's cached scenes whose objects come from another light "
        "(their prompt still names the scene's light)",
    )
    parser.add_argument("--scenes", type=int, default=4096)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--save-every", type=int, default=50)
    # Two threads on an idle 2-core machine; with other jobs on the cores use one (two
    # threads then ran 5-8x slower: torch's workers spin waiting for each other).
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--probe", action="store_true", help="time a few steps, project the run, and exit"
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="what to train on: cpu, cuda, cuda:N or mps (--probe always times the CPU)",
    )
    parser.add_argument("--probe-steps", type=int, default=4, help="timed steps per stage")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="end the UNet stage at this step (a checkpoint's step: export it as it is)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _arch(args)
    except ValueError as error:  # sizes the model cannot have: before anything is written
        parser.error(f"--arch {args.arch} with these sizes: {error}")
    torch.set_num_threads(args.threads)
    if args.probe:
        probe(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vae = init_vae(args) if args.init else train_vae(args, work)
    cache = cache_latents(args, work, vae)
    unet, text = train_unet(args, work, cache)
    export(args, work, vae, cache, unet, text)


if __name__ == "__main__":
    main()

"""Per-layer textual inversion (docs/design.md 2.3): one learned token per layer, cached on disk.

For each target (a layer, with the collage composited up to it) a new token is
added to every tokenizer of the engine and its embedding row is trained, in
every text encoder (SD 1.x/2.x: one, SDXL: both), with the diffusion
noise-prediction loss masked to the layer's visible area. Nothing else of the
model changes: the trainable rows live outside the embedding matrices during
training (a forward hook splices them in), so no other weight can move, and
they are written into the matrices once at the end. The token's name is derived
from the cache key, so a token name always means the same embedding and a
prompt that contains it can be cached by anyone.

The engine knows nothing of Photoshop; the render module prepends the tokens
to the layers' captions.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel

from ..atomic import atomic_write_bytes
from ..errors import Cancelled, CollageError, SettingsError
from . import ti_cache
from .sampler import encode_posterior, sdxl_time_ids
from .ti_cache import cache_dir
from .tokens import encode_ids

__all__ = [
    "InversionSettings",
    "InversionTarget",
    "LearnedToken",
    "cache_dir",
    "export_embeddings",
    "learn_inversions",
    "learn_tokens",
]

log = logging.getLogger(__name__)

#: Prompt templates, as in the textual-inversion paper's "a photo of S*"; one per batch item.
TEMPLATES = (
    "a photo of {token} {caption}",
    "a rendering of {token} {caption}",
    "{token} {caption}",
    "a picture of {token} {caption}",
)

#: Size of the fixed probe batch that measures the loss before and after training.
_PROBE_SAMPLES = 8
#: Added to the seed for the probe batch's noises, so they differ from the training noises.
_PROBE_SEED_OFFSET = 7919
#: AdamW weight decay on the new embedding rows (diffusers' textual-inversion example).
WEIGHT_DECAY = 1e-2

# Words that never make a good initialiser for the new token (articles, prepositions...).
_STOPWORDS_TEXT = """
a an the of in on at to for with without from by and or but is are was were be
this that these those its his her their my our your some any one two three very
into onto over under near behind front back left right top bottom
"""
# Adjectives common in captions: used only when no noun-ish word is a single token.
_ADJECTIVES_TEXT = """
red green blue yellow purple pink brown black white grey gray golden silver
dark bright pale big small large tiny huge old new young vintage modern
beautiful pretty ugly shiny wooden happy sad tall short long round
"""
_STOPWORDS = frozenset(_STOPWORDS_TEXT.split())
_ADJECTIVES = frozenset(_ADJECTIVES_TEXT.split())


@dataclass(frozen=True)
class InversionSettings:
    """The training recipe; the authors' defaults: 250 steps, lr 4e-4, batch 4."""

    steps: int = 250
    lr: float = 4e-4
    batch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise ValueError(f"bad textual-inversion settings {self}: steps, batch, lr must be > 0")


@dataclass
class InversionTarget:
    """One layer to learn a token for."""

    name: str  # for messages and progress (the layer name)
    image: np.ndarray  # (h, w, 3) float32 sRGB [0, 1]: the collage composited up to this layer
    mask: np.ndarray  # (h, w) float32 [0, 1]: the layer's visible mask; the loss is masked to it
    caption: str  # the new token is initialised from a word of it


@dataclass
class LearnedToken:
    """What :func:`learn_inversions` did for one target."""

    token: str  # e.g. "<ti-3a9f0c12>", usable in this engine's prompts
    name: str
    init_word: str | None  # the caption word the row started from; None: the mean embedding
    cached: bool  # True: loaded from the cache, no training step ran
    losses: list[float] = field(default_factory=list)  # masked MSE per training step
    # Masked MSE on a fixed probe batch before / after training (see _train); the
    # before-after difference is what the token learned. Stored in the cache entry.
    probe_loss: tuple[float, float] = (float("nan"), float("nan"))
    seconds: float = 0.0


def learn_tokens(
    engine,
    targets: Sequence[InversionTarget],
    settings: InversionSettings = InversionSettings(),
    *,
    cache: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> list[str]:
    """One token string per target, already usable in this engine's prompts.

    ``cache`` is the cache root (default :func:`cache_dir`); entries live in ``<cache>/ti``.
    ``progress(done, total)`` counts training steps over the targets that are not cached;
    when every target is cached it is called once with ``(0, 0)``. ``cancel()`` returning
    True raises :class:`~psd_collage.errors.Cancelled` before the next step.
    """
    results = learn_inversions(
        engine, targets, settings, cache=cache, progress=progress, cancel=cancel
    )
    return [r.token for r in results]


def learn_inversions(
    engine,
    targets: Sequence[InversionTarget],
    settings: InversionSettings = InversionSettings(),
    *,
    cache: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> list[LearnedToken]:
    """Like :func:`learn_tokens`, with each token's loss history and whether it was cached."""
    if targets and not getattr(engine, "supports_textual_inversion", True):
        raise SettingsError(
            f"layer {targets[0].name!r} asks for textual inversion, which {engine.kind} models "
            "do not support: remove its ti tag (or set ti off), or use a Stable Diffusion "
            "1.x/2.x/SDXL model"
        )
    plans = _cache_keys(engine, targets, settings)
    # Look every target up first, so that progress knows the total before the first step.
    components = engine.components
    dims = [enc.get_input_embeddings().weight.shape[1] for enc in components.text_encoders]
    known: dict[str, ti_cache.CacheEntry] = {}
    for _, key, _ in plans:
        if key not in known and (entry := ti_cache.load_entry(key, dims, cache)) is not None:
            known[key] = entry
    to_train = list(dict.fromkeys(key for _, key, _ in plans if key not in known))
    total = settings.steps * len(to_train)
    done = 0
    if progress is not None and total == 0:
        progress(0, 0)

    def step_done() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    results: dict[str, LearnedToken] = {}
    out: list[LearnedToken] = []
    for target, key, token in plans:
        if key in results:  # the same layer twice: same key, same token
            previous = results[key]
            out.append(
                LearnedToken(
                    token, target.name, previous.init_word, previous.cached, [], previous.probe_loss
                )
            )
            continue
        ids = _install_token(components, token)
        if key in known:
            result = _from_cache(components, ids, token, target, known[key])
        else:
            learn = _Learning(engine, target, key, token, ids, settings)
            result = learn.run(cache, step=step_done, cancel=cancel)
        results[key] = result
        out.append(result)
    return out


def _cache_keys(
    engine, targets: Sequence[InversionTarget], settings: InversionSettings
) -> list[tuple[InversionTarget, str, str]]:
    """(target, cache key, token name) per target; the token's name comes from the key."""
    components = engine.components
    fingerprint = ti_cache.model_fingerprint(components)
    recipe = (*TEMPLATES, *_init_recipe())
    plans = []
    for target in targets:
        _check_target(target)
        key = ti_cache.entry_key(
            model_name=engine.model_identity,
            kind=components.kind,
            fingerprint=fingerprint,
            image=target.image,
            mask=target.mask,
            caption=target.caption,
            settings=(settings.steps, settings.lr, settings.batch, settings.seed),
            recipe=recipe,
        )
        plans.append((target, key, f"<ti-{key[:10]}>"))
    return plans


def _from_cache(
    components, ids: Sequence[int], token: str, target: InversionTarget, entry: ti_cache.CacheEntry
) -> LearnedToken:
    """Install a cached token's rows."""
    _set_rows(components, ids, entry.rows)
    meta = entry.metadata
    probe = (_float(meta.get("probe_loss_before")), _float(meta.get("probe_loss_after")))
    return LearnedToken(token, target.name, meta.get("init_word") or None, True, [], probe)


@dataclass
class _Learning:
    """Training one token and caching what it learned."""

    engine: Any
    target: InversionTarget
    key: str
    token: str
    ids: Sequence[int]
    settings: InversionSettings

    def run(
        self,
        cache: Path | None,
        *,
        step: Callable[[], None],
        cancel: Callable[[], bool] | None,
    ) -> LearnedToken:
        components, target, settings = self.engine.components, self.target, self.settings
        start = time.perf_counter()
        init_word = _init_word(components, target.caption)
        init_rows = _init_rows(components, init_word)
        _set_rows(components, self.ids, init_rows)  # a cancelled training leaves a sane row
        rows, losses, probe = _train(
            self.engine, target, self.ids, init_rows, settings, step=step, cancel=cancel
        )
        _set_rows(components, self.ids, rows)
        meta = {
            "token": self.token,
            "name": target.name,
            "caption": target.caption,
            "model": str(self.engine.model_name),
            "kind": components.kind,
            "init_word": init_word or "",
            "steps": str(settings.steps),
            "probe_loss_before": repr(probe[0]),
            "probe_loss_after": repr(probe[1]),
        }
        ti_cache.save_entry(self.key, rows, meta, cache)
        seconds = time.perf_counter() - start
        log.info(
            "learned %s for layer %r in %.1fs (probe loss %.4g -> %.4g)",
            self.token,
            target.name,
            seconds,
            *probe,
        )
        return LearnedToken(self.token, target.name, init_word, False, losses, probe, seconds)


def export_embeddings(engine, tokens: Sequence[str], path: Path) -> Path:
    """Write learned tokens in the standard textual-inversion safetensors format.

    SD 1.x/2.x: ``{token: (1, dim)}`` (diffusers' ``pipe.load_textual_inversion(file)`` and
    A1111 load it). SDXL: ``{"clip_l": (1, 768), "clip_g": (1, 1280)}``; with diffusers, load
    each half into its encoder: ``load_textual_inversion(sd["clip_l"], token=t,
    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`` and the same with
    ``clip_g`` / ``text_encoder_2`` / ``tokenizer_2``.

    ``path`` ending in ``.safetensors`` is one file for exactly one token; any other path is
    a folder that gets one ``<token name>.safetensors`` per token (``<ti-3a9f>`` ->
    ``ti-3a9f.safetensors``). Returns the file or the folder. Files are written atomically.
    """
    path = Path(path)
    components = engine.components
    if path.suffix == ".safetensors":
        if len(tokens) != 1:
            raise ValueError(f"{path}: one file holds one token; pass a folder for {len(tokens)}")
        files = [(tokens[0], path)]
    else:
        path.mkdir(parents=True, exist_ok=True)
        files = [(token, path / f"{_file_stem(token)}.safetensors") for token in tokens]
    for token, file in files:
        rows = _get_rows(components, token)
        if components.kind == "sdxl":
            tensors = {"clip_l": rows[0][None], "clip_g": rows[1][None]}
        else:
            tensors = {token: rows[0][None]}
        meta = {"token": token, "model": str(engine.model_name), "kind": components.kind}
        data = safetensors.torch.save(
            {k: v.to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, metadata=meta
        )
        atomic_write_bytes(file, data)
    return path


# --------------------------------------------------------------------------- tokens


def _check_target(target: InversionTarget) -> None:
    image, mask = np.asarray(target.image), np.asarray(target.mask)
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(
            f"layer {target.name!r}: image must be (h, w, 3) and mask (h, w); "
            f"got {image.shape} and {mask.shape}"
        )
    if image.shape[0] % 8 or image.shape[1] % 8:
        raise ValueError(
            f"layer {target.name!r}: image size {image.shape[:2]} is not a multiple of 8"
        )
    if not float(np.max(mask, initial=0.0)) > 0:
        raise CollageError(
            f"layer {target.name!r} has no visible pixels, so textual inversion has nothing to "
            "learn from: remove its ti tag or move it where it can be seen"
        )


def _install_token(components, token: str) -> list[int]:
    """Add ``token`` to every tokenizer (once) and make room for its row in every encoder."""
    ids = []
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([token])
        token_id = tokenizer.convert_tokens_to_ids(token)
        encoded = tokenizer(f"{token} x", add_special_tokens=False).input_ids
        if not encoded or encoded[0] != token_id:
            raise RuntimeError(f"tokenizer splits the learned token {token!r}: {encoded}")
        rows = encoder.get_input_embeddings().weight.shape[0]
        if token_id >= rows:
            # mean_resizing=False: the new row is set right after, the covariance would be wasted.
            encoder.resize_token_embeddings(token_id + 1, mean_resizing=False)
        _pool_at_first_eos(encoder, tokenizer)
        ids.append(token_id)
    return ids


def _pool_at_first_eos(encoder: torch.nn.Module, tokenizer) -> None:
    """Make CLIP pool at the end-of-text token even when the prompt holds an added token.

    Released SD / SDXL text-encoder configs carry the old ``eos_token_id = 2``, for which
    transformers pools at the *highest token id* of the prompt: an added token outranks
    end-of-text, so SDXL's pooled embedding would come from the learned token's position.
    Pointing the model at the tokenizer's real end-of-text id pools at its first occurrence,
    which is exactly the highest-id position for every prompt without added tokens (end of
    text is the last id of the base vocabulary; checked), so nothing else changes.
    """
    eos = tokenizer.eos_token_id
    if eos is None or eos == 2 or eos != tokenizer.vocab_size - 1:
        return
    for module in encoder.modules():
        if isinstance(module, CLIPTextModel) and module.eos_token_id == 2:
            module.eos_token_id = eos
            module.config.eos_token_id = eos


def _set_rows(components, ids: Sequence[int], rows: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for encoder, token_id, row in zip(components.text_encoders, ids, rows, strict=True):
            weight = encoder.get_input_embeddings().weight
            weight[token_id] = row.to(weight.device, weight.dtype)


def _get_rows(components, token: str) -> list[torch.Tensor]:
    rows = []
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        if token not in tokenizer.get_vocab():
            raise ValueError(f"{token!r} is not a token of this engine; learn it first")
        weight = encoder.get_input_embeddings().weight
        rows.append(weight[tokenizer.convert_tokens_to_ids(token)].detach().float().cpu())
    return rows


def _float(text: str | None) -> float:
    try:
        return float(text) if text is not None else float("nan")
    except ValueError:
        return float("nan")


def _file_stem(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "", token) or "token"


def _init_recipe() -> tuple[str, ...]:
    """Part of the cache key: changing how the start word is chosen changes the result."""
    return ("init:last-noun-ish-single-token", " ".join(sorted(_STOPWORDS | _ADJECTIVES)))


def _init_word(components, caption: str) -> str | None:
    """The caption word the new token starts from, or None for the mean embedding.

    The last noun-ish word ("a red vintage car" -> "car") that every tokenizer encodes as
    one token; failing that any single-token word; failing that None.
    """
    words = [w for w in re.findall(r"[a-z]+", caption.lower()) if len(w) > 1 or w == "a"]

    def single(word: str) -> bool:
        return all(
            len(t(word, add_special_tokens=False).input_ids) == 1 for t in components.tokenizers
        )

    nounish = [
        w for w in words if w not in _STOPWORDS and w not in _ADJECTIVES and not w.endswith("ly")
    ]
    for pool in (nounish, [w for w in words if w not in _STOPWORDS], words):
        for word in reversed(pool):
            if single(word):
                return word
    return None


def _init_rows(components, word: str | None) -> list[torch.Tensor]:
    rows = []
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        weight = encoder.get_input_embeddings().weight.detach()
        if word is None:
            row = weight[: tokenizer.vocab_size].float().mean(0)
        else:
            row = weight[tokenizer(word, add_special_tokens=False).input_ids[0]].float()
        rows.append(row.cpu().clone())
    return rows


# --------------------------------------------------------------------------- training


def _train(
    engine,
    target: InversionTarget,
    ids: Sequence[int],
    init_rows: Sequence[torch.Tensor],
    settings: InversionSettings,
    *,
    step: Callable[[], None],
    cancel: Callable[[], bool] | None,
) -> tuple[list[torch.Tensor], list[float], tuple[float, float]]:
    """Train the new rows: returns them (float32, CPU), every step's loss, the probe losses."""
    device = torch.device(engine.device)
    gen = torch.Generator("cpu").manual_seed(int(settings.seed))
    params = [torch.nn.Parameter(r.to(device, torch.float32).clone()) for r in init_rows]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=WEIGHT_DECAY)
    # fp16 weights: scale the loss so that small gradients do not underflow in the backward pass.
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and engine.dtype == torch.float16
    )
    losses: list[float] = []
    with _training_context(engine, params, ids):
        loss_of = _MaskedLoss(engine, target, _token_of(engine.components, ids))
        # A fixed probe set (timesteps spread over the schedule, fixed noises): the same
        # batch before and after training measures what the token learned, free of the
        # sampling noise that dominates the per-step training losses.
        probe = loss_of.probe_batch(int(settings.seed) + _PROBE_SEED_OFFSET)
        with torch.no_grad():
            probe_before = float(loss_of(*probe))
        for _ in range(settings.steps):
            if cancel is not None and cancel():
                raise Cancelled()
            loss = loss_of(*loss_of.random_batch(settings.batch, gen))
            if not torch.isfinite(loss):
                raise CollageError(
                    f"layer {target.name!r}: textual inversion diverged (loss {loss.item()}); "
                    "lower ti_lr or turn ti off for this layer"
                )
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step()
        with torch.no_grad():
            probe_after = float(loss_of(*probe))
    rows = [p.detach().to("cpu", torch.float32).clone() for p in params]
    return rows, losses, (probe_before, probe_after)


class _MaskedLoss:
    """The masked noise-prediction MSE of a batch (per latent channel and visible cell).

    A batch is (timesteps, noises, posterior samples, template index per item).
    """

    def __init__(self, engine, target: InversionTarget, token: str) -> None:
        components = engine.components
        self.components = components
        self.device = device = torch.device(engine.device)
        self.scheduler = DDPMScheduler.from_config(components.scheduler.config)
        self.timesteps = self.scheduler.config.num_train_timesteps
        # Prompt ids for every template, per tokenizer: chosen per batch item at each step.
        prompts = [t.format(token=token, caption=target.caption) for t in TEMPLATES]
        self.prompt_ids = [
            tok(
                prompts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            for tok in components.tokenizers
        ]
        with torch.no_grad():
            self.mean, self.std = encode_posterior(components.vae, target.image, device)
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.std).all()):
            raise RuntimeError(
                "the VAE produced non-finite latents for the textual-inversion image"
            )
        self.weight = _latent_mask(target.mask, self.mean.shape[-2:], device)
        self.size = target.image.shape[:2]

    def random_batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        shape = (n, *self.mean.shape[1:])
        return (
            torch.randint(0, self.timesteps, (n,), generator=gen),
            torch.randn(shape, generator=gen),
            torch.randn(shape, generator=gen),
            torch.randint(0, len(TEMPLATES), (n,), generator=gen),
        )

    def probe_batch(self, seed: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator("cpu").manual_seed(seed)
        n, shape = _PROBE_SAMPLES, (_PROBE_SAMPLES, *self.mean.shape[1:])
        return (
            torch.linspace(0, self.timesteps - 1, n).round().long(),
            torch.randn(shape, generator=gen),
            torch.randn(shape, generator=gen),
            torch.arange(n) % len(TEMPLATES),
        )

    def __call__(self, timesteps, noise, sample, which) -> torch.Tensor:
        device, unet = self.device, self.components.unet
        timesteps, noise, sample = timesteps.to(device), noise.to(device), sample.to(device)
        latents = self.mean + self.std * sample
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        cond = encode_ids(self.components, [p[which.to(device)] for p in self.prompt_ids])
        added = None
        if self.components.kind == "sdxl":
            time_ids = sdxl_time_ids(self.size, len(timesteps), dtype=unet.dtype, device=device)
            added = {"text_embeds": cond.pooled.to(unet.dtype), "time_ids": time_ids}
        pred = unet(
            noisy.to(unet.dtype),
            timesteps,
            encoder_hidden_states=cond.hidden.to(unet.dtype),
            added_cond_kwargs=added,
        ).sample.float()
        if self.scheduler.config.prediction_type == "v_prediction":
            goal = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            goal = noise
        err = (pred - goal.float()) ** 2 * self.weight
        return err.sum() / (self.weight.sum() * pred.shape[0] * pred.shape[1])


def _token_of(components, ids: Sequence[int]) -> str:
    return components.tokenizers[0].convert_ids_to_tokens(ids[0])


def _latent_mask(mask: np.ndarray, size, device: torch.device) -> torch.Tensor:
    """The visible mask averaged onto the latent grid: (1, 1, h/8, w/8)."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(m.clamp(0, 1), size=tuple(size), mode="area").to(device)


@contextmanager
def _training_context(engine, params: Sequence[torch.nn.Parameter], ids: Sequence[int]) -> Iterator:
    """Freeze every weight, splice the trainable rows into the encoders, restore it all after.

    The modules stay in eval mode (dropout off: training is deterministic and the
    models come back as they were). The UNet's cross-attention runs with diffusers'
    plain processor, so the engine's steering processor cannot bias training.
    """
    components = engine.components
    unet = components.unet
    modules = [unet, components.vae, *components.text_encoders]
    grad_flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for m in modules]
    processors = dict(unet.attn_processors)
    checkpointing = unet.is_gradient_checkpointing

    def restore() -> None:
        if unet.is_gradient_checkpointing != checkpointing:
            unet.disable_gradient_checkpointing()
        unet.set_attn_processor(processors)
        for m, mode in modes:
            m.train(mode)
        for p, flag in grad_flags:
            p.requires_grad_(flag)

    with ExitStack() as stack:
        # With the engine's CPU offload the models live on the CPU between uses.
        stack.enter_context(engine.on_device(*modules))
        stack.callback(restore)
        for m in modules:
            m.requires_grad_(False)
            m.eval()
        unet.set_attn_processor(
            {
                name: AttnProcessor2_0() if name.endswith("attn2.processor") else processor
                for name, processor in processors.items()
            }
        )
        if torch.device(engine.device).type != "cpu" and not checkpointing:
            unet.enable_gradient_checkpointing()  # the UNet backward's activations, on a GPU
        for encoder, token_id, param in zip(components.text_encoders, ids, params, strict=True):
            embeddings = encoder.get_input_embeddings()
            stack.callback(embeddings.register_forward_hook(_splice(token_id, param)).remove)
        stack.enter_context(torch.enable_grad())
        yield


def _splice(token_id: int, param: torch.nn.Parameter):
    """A forward hook that replaces the token's embedding with the trainable row."""

    def hook(module, inputs, output):
        where = (inputs[0] == token_id)[..., None]
        return torch.where(where, param.to(output.dtype), output)

    return hook

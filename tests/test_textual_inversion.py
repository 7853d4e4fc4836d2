"""Per-layer textual inversion on the tiny random-weight models: training, cache, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from psd_collage.engine import ti_cache
from psd_collage.engine.textual_inversion import (
    InversionSettings,
    InversionTarget,
    cache_dir,
    export_embeddings,
    learn_inversions,
    learn_tokens,
)
from psd_collage.errors import Cancelled, CollageError

SIZE = 64  # px: 8 x 8 latents, enough for a masked loss and fast on two busy cores
FAST = InversionSettings(steps=6, lr=5e-3, batch=2, seed=0)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two busy cores shared by several test runs: torch's spinning threads only slow it down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_engine(kind: str = "sd1"):
    from psd_collage.engine import load_engine

    return load_engine("tiny" if kind == "sd1" else "tiny-sdxl")


def square_target(name="car", caption="a red vintage car", colour=(0.9, 0.1, 0.1), seed=0):
    """A coloured square on a grey collage, its mask the square."""
    rng = np.random.default_rng(seed)
    image = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    image += rng.normal(0, 0.05, image.shape).astype(np.float32)
    image[16:48, 12:44] = colour
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[16:48, 12:44] = 1.0
    return InversionTarget(name=name, image=np.clip(image, 0, 1), mask=mask, caption=caption)


def row(engine, token: str, encoder: int = 0) -> torch.Tensor:
    tokenizer = engine.components.tokenizers[encoder]
    weight = engine.components.text_encoders[encoder].get_input_embeddings().weight
    return weight[tokenizer.convert_tokens_to_ids(token)].detach().clone()


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "ti").glob("*.safetensors"))


def test_training_lowers_the_masked_loss_and_touches_nothing_else(tmp_path):
    engine = make_engine()
    comps = engine.components
    embeddings_before = comps.text_encoders[0].get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    calls = []

    [result] = learn_inversions(
        engine,
        [square_target()],
        InversionSettings(steps=24, lr=2e-3, batch=4),
        cache=tmp_path,
        progress=lambda done, total: calls.append((done, total)),
    )

    # The loss on the fixed probe batch drops: the token learned something about the layer.
    before, after = result.probe_loss
    assert after < before
    assert len(result.losses) == 24 and np.isfinite(result.losses).all()
    assert calls == [(i, 24) for i in range(1, 25)]
    assert not result.cached and result.init_word == "car"
    # The token is a real token of the tokenizer, and its row moved away from "car".
    tokenizer = comps.tokenizers[0]
    ids = tokenizer(f"{result.token} a red vintage car", add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids(result.token)
    car = tokenizer("car", add_special_tokens=False).input_ids[0]
    assert not torch.allclose(row(engine, result.token), embeddings_before[car])
    # Every other weight is untouched, and the models are left frozen, in eval mode.
    after_weight = comps.text_encoders[0].get_input_embeddings().weight
    assert torch.equal(after_weight[: embeddings_before.shape[0]], embeddings_before)
    for key, value in comps.unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), key
    for module in (comps.unet, comps.vae, *comps.text_encoders):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_cache_hit_restart_and_corrupt_entry(tmp_path):
    target = square_target()
    engine = make_engine()
    [token] = learn_tokens(engine, [target], FAST, cache=tmp_path)
    learned = row(engine, token)
    [entry] = entries(tmp_path)

    # Same engine, same inputs: no training step, the same token and embedding.
    calls = []
    [again] = learn_inversions(
        engine, [target], FAST, cache=tmp_path, progress=lambda d, t: calls.append((d, t))
    )
    assert again.cached and again.losses == [] and calls == [(0, 0)]
    assert again.token == token and torch.equal(row(engine, token), learned)

    # A "restart": a new engine object loads the entry without training.
    fresh = make_engine()
    calls.clear()
    [restarted] = learn_inversions(
        fresh, [target], FAST, cache=tmp_path, progress=lambda d, t: calls.append((d, t))
    )
    assert restarted.cached and calls == [(0, 0)]
    assert torch.equal(row(fresh, token), learned)

    # A truncated entry is learned again (same result: training is seeded) and rewritten.
    entry.write_bytes(entry.read_bytes()[:50])
    fresh = make_engine()
    calls.clear()
    [retrained] = learn_inversions(
        fresh, [target], FAST, cache=tmp_path, progress=lambda d, t: calls.append((d, t))
    )
    assert not retrained.cached and calls[-1] == (FAST.steps, FAST.steps)
    assert torch.equal(row(fresh, token), learned)
    assert ti_cache.load_entry(entry.stem, [learned.shape[0]], tmp_path) is not None


def test_cache_key_and_loss_follow_the_inputs(tmp_path):
    engine = make_engine()
    target = square_target()
    [first] = learn_inversions(engine, [target], FAST, cache=tmp_path)
    moved = InversionTarget(
        target.name, target.image, np.roll(target.mask, 16, axis=1), target.caption
    )
    [other] = learn_inversions(engine, [moved], FAST, cache=tmp_path)
    [longer] = learn_tokens(
        engine, [target], InversionSettings(steps=7, lr=5e-3, batch=2), cache=tmp_path
    )
    assert len({first.token, other.token, longer}) == 3
    assert len(entries(tmp_path)) == 3
    # Same image, same seed, another mask: the loss is taken over other latent cells.
    assert not np.allclose(first.losses, other.losses)


def test_two_targets_learn_two_tokens(tmp_path):
    engine = make_engine()
    car = square_target()
    sky = square_target("sky", "a blue sky", colour=(0.2, 0.4, 0.95), seed=1)
    calls = []
    results = learn_inversions(
        engine, [car, sky, car], FAST, cache=tmp_path, progress=lambda d, t: calls.append((d, t))
    )
    assert [r.init_word for r in results] == ["car", "sky", "car"]
    assert results[0].token != results[1].token and results[2].token == results[0].token
    assert not torch.allclose(row(engine, results[0].token), row(engine, results[1].token))
    assert calls[-1] == (2 * FAST.steps, 2 * FAST.steps)  # the repeated layer trains once
    assert len(entries(tmp_path)) == 2


def test_init_word_falls_back_to_any_word_then_the_mean(tmp_path):
    engine = make_engine()
    one = InversionSettings(steps=1, batch=1)
    targets = [
        square_target(caption="a red vintage car"),
        square_target(caption="a red zorblaxian"),  # no single-token noun: an adjective
        square_target(caption="zorblaxian qwxyz"),  # no single-token word at all
    ]
    results = learn_inversions(engine, targets, one, cache=tmp_path)
    assert [r.init_word for r in results] == ["car", "red", None]


def test_export_loads_in_diffusers_sd1(tmp_path):
    from psd_collage.engine.models import build_tiny_pipeline

    engine = make_engine()
    tokens = learn_tokens(
        engine, [square_target(), square_target("sky", "a blue sky", seed=1)], FAST, cache=tmp_path
    )
    file = export_embeddings(engine, tokens[:1], tmp_path / "car.safetensors")
    assert set(safetensors.torch.load_file(file)) == {tokens[0]}
    pipe = build_tiny_pipeline("sd1")
    pipe.load_textual_inversion(str(file))  # the token name comes from the file
    loaded = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(
        loaded[pipe.tokenizer.convert_tokens_to_ids(tokens[0])], row(engine, tokens[0])
    )

    folder = export_embeddings(engine, tokens, tmp_path / "all")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{t.strip('<>')}.safetensors" for t in tokens
    )


def test_sdxl_trains_both_encoders_and_exports_clip_l_and_clip_g(tmp_path):
    from psd_collage.engine.models import build_tiny_pipeline

    engine = make_engine("sdxl")
    encoders = engine.components.text_encoders
    settings = InversionSettings(steps=8, lr=5e-3, batch=2)
    [result] = learn_inversions(engine, [square_target()], settings, cache=tmp_path)
    assert result.probe_loss[1] < result.probe_loss[0]
    for i, tokenizer in enumerate(engine.components.tokenizers):
        car = encoders[i].get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("car")]
        assert not torch.allclose(row(engine, result.token, i), car)  # both rows trained

    file = export_embeddings(engine, [result.token], tmp_path / "car.safetensors")
    state = safetensors.torch.load_file(file)
    assert set(state) == {"clip_l", "clip_g"}
    pipe = build_tiny_pipeline("sdxl")
    pipe.load_textual_inversion(
        state["clip_l"],
        token=result.token,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )
    pipe.load_textual_inversion(
        state["clip_g"],
        token=result.token,
        text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2,
    )
    for i, (tok, enc) in enumerate(
        [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    ):
        loaded = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(result.token)]
        assert torch.equal(loaded, row(engine, result.token, i))


def test_cancel_stops_training_and_leaves_the_model_usable(tmp_path):
    engine = make_engine()
    comps = engine.components
    polls = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(Cancelled):
        learn_tokens(engine, [square_target()], FAST, cache=tmp_path, cancel=cancel)
    assert len(polls) == 3 and entries(tmp_path) == []
    for module in (comps.unet, comps.text_encoders[0]):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert not comps.text_encoders[0].get_input_embeddings()._forward_hooks


def test_layer_with_no_visible_pixels_is_a_user_error(tmp_path):
    target = square_target(name="hidden car")
    target.mask[:] = 0
    with pytest.raises(CollageError, match="hidden car"):
        learn_tokens(make_engine(), [target], FAST, cache=tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PSD_COLLAGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "psd-collage"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "psd-collage"
    monkeypatch.setenv("PSD_COLLAGE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    # The default cache location is used when no cache argument is given.
    engine = make_engine()
    learn_tokens(engine, [square_target()], InversionSettings(steps=1, batch=1))
    assert len(entries(tmp_path / "mine")) == 1


def test_learned_token_is_located_and_steered_by_the_engine(tmp_path):
    from psd_collage.engine import GenerationRequest, SteeredPhrase
    from psd_collage.engine.tokens import locate_captions

    engine = make_engine()
    target = square_target()
    [token] = learn_tokens(engine, [target], FAST, cache=tmp_path)
    tokened = f"{token} {target.caption}"
    tokenizer = engine.components.tokenizers[0]

    # The render prepends the token to the caption; the engine finds the whole phrase,
    # the learned token included, and steers all of its tokens.
    prompt = f"a quiet street, {tokened}"
    _, [span], warnings = locate_captions(engine.components.tokenizers, prompt, [tokened])
    assert warnings == [] and span is not None
    ids = tokenizer(prompt).input_ids
    assert ids[span.start] == tokenizer.convert_tokens_to_ids(token)
    assert span.length == 1 + len(tokenizer(target.caption, add_special_tokens=False).input_ids)

    def generate(caption: str):
        request = GenerationRequest(
            image=target.image,
            strength=np.full((SIZE, SIZE), 0.8, np.float32),
            prompt=f"a quiet street, {caption}",
            phrases=[SteeredPhrase(text=caption, mask=target.mask, inside=0.6, outside=0.9)],
            seeds=[3],
            steps=4,
            guidance=3.0,
        )
        return engine.generate(request)

    with_ti, without = generate(tokened), generate(target.caption)
    assert with_ti.warnings == [] and with_ti.prompt == prompt
    assert np.abs(with_ti.images[0] - without.images[0]).max() > 1e-3


def test_sdxl_pooled_embedding_stays_at_end_of_text_with_a_learned_token(tmp_path):
    # Released CLIP configs say eos_token_id = 2, which makes transformers pool at the
    # highest token id: without care that is the learned token, not the end of text.
    engine = make_engine("sdxl")
    tokenizer, encoder = engine.components.tokenizers[1], engine.components.text_encoders[1]
    encoder.text_model.eos_token_id = encoder.config.eos_token_id = 2
    plain = tokenizer("a red vintage car", return_tensors="pt").input_ids
    with torch.no_grad():
        before = encoder(plain).text_embeds

    [token] = learn_tokens(
        engine, [square_target()], InversionSettings(steps=1, batch=1), cache=tmp_path
    )
    ids = tokenizer(f"{token} a red vintage car", return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        after = encoder(plain).text_embeds
    eos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    hidden = encoder.text_model.final_layer_norm(out.hidden_states[-1])  # what CLIP pools from
    assert torch.allclose(out.text_embeds, encoder.text_projection(hidden[:, eos]), atol=1e-6)
    assert torch.equal(after, before)  # prompts without added tokens pool exactly as before

"""Cross-attention bias: the formula, only the conditional rows, and its effect on attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from engine_helpers import tiny_engine, two_phrase_request

from psd_collage.engine.attention import CollageCrossAttnProcessor, SteeringState, sigma_weight
from psd_collage.engine.tokens import locate_captions


def _reference(attn: Attention, x, context, masks_lat, weights, phrase_tokens, factor, cond_start):
    """The paper's formula written out token by token, phrase by phrase."""
    heads = attn.heads
    q = attn.to_q(x)
    k = attn.to_k(context)
    v = attn.to_v(context)
    batch, pixels, inner = q.shape
    d = inner // heads
    q = q.view(batch, pixels, heads, d).transpose(1, 2)
    k = k.view(batch, -1, heads, d).transpose(1, 2)
    v = v.view(batch, -1, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / d**0.5
    for b in range(cond_start, batch):
        original = scores[b].clone()
        for i, tokens in enumerate(phrase_tokens):
            peak = original[:, :, tokens].max()
            inside, outside = weights[i]
            m = masks_lat[i].flatten()
            for j in tokens:
                for p in range(pixels):
                    scores[b, :, p, j] += inside * m[p] * factor * peak
                    scores[b, :, p, j] -= outside * (1 - m[p]) * factor * peak
    out = scores.softmax(-1) @ v
    out = out.transpose(1, 2).reshape(batch, pixels, inner)
    return attn.to_out[0](out)


@torch.no_grad()
def test_bias_matches_the_paper_formula_on_conditional_rows_only():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    latent = (4, 6)  # a non-square grid: 24 pixels
    masks_lat = torch.zeros(2, *latent)
    masks_lat[0, :, :3] = 1.0
    masks_lat[1, 2:, 2:5] = torch.tensor([0.25, 0.5, 1.0])
    masks_img = masks_lat.repeat_interleave(8, 1).repeat_interleave(8, 2)  # image size 32 x 48
    weights = [(0.6, 0.9), (1.5, 0.2)]
    phrase_tokens = [[1, 2], [4]]
    token_phrase = torch.tensor([-1, 0, 0, -1, 1, -1, -1])
    state = SteeringState()
    state.set_phrases(masks_img, torch.tensor(weights), token_phrase, latent)
    state.cond_start = 2
    state.factor = sigma_weight(3.0)
    x = torch.randn(4, 24, 16) * 3
    context = torch.randn(4, 7, 8) * 3

    ours = CollageCrossAttnProcessor(state)(attn, x, context)
    expected = _reference(attn, x, context, masks_lat, weights, phrase_tokens, state.factor, 2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)

    recorded = []  # the recording path (explicit softmax) computes the same thing
    state.recorder = lambda name, probs, grid: recorded.append((probs, grid))
    torch.testing.assert_close(CollageCrossAttnProcessor(state)(attn, x, context), ours)
    state.recorder = None
    probs, grid = recorded[0]
    assert grid == latent and probs.shape == (2, 2, 24, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 24))

    plain = AttnProcessor2_0()(attn, x, context)
    torch.testing.assert_close(ours[:2], plain[:2], atol=1e-5, rtol=1e-4)  # unconditional rows
    assert (ours[2:] - plain[2:]).abs().max() > 1e-2  # the conditional rows were steered

    state.clear()
    torch.testing.assert_close(CollageCrossAttnProcessor(state)(attn, x, context), plain)


def test_sigma_weight_fades_out_as_noise_goes_down():
    assert sigma_weight(14.6) > 1.2
    assert sigma_weight(1.0) > sigma_weight(0.1) > sigma_weight(0.01) > 0
    assert sigma_weight(0.0) == pytest.approx(np.log(np.log(1.01) + 1))


def _attention_shares(engine, request):
    """Mean share of each phrase's attention mass that falls inside its own mask."""
    _, spans, _ = locate_captions(
        engine.components.tokenizers, request.prompt, [p.text for p in request.phrases]
    )
    shares: list[list[float]] = [[] for _ in request.phrases]
    grids: set[tuple[int, int]] = set()

    def record(name, probs, grid):
        grids.add(grid)
        for i, (phrase, span) in enumerate(zip(request.phrases, spans, strict=True)):
            mass = probs[..., list(span.positions())].sum(-1)  # (B, heads, pixels)
            mask = F.adaptive_avg_pool2d(torch.from_numpy(phrase.mask)[None, None], grid).flatten()
            shares[i].append(float((mass * mask).sum() / mass.sum()))

    with engine.record_attention(record):
        engine.generate(request)
    return [float(np.mean(s)) for s in shares], grids


@pytest.mark.parametrize(
    ("model", "height", "width"),
    [("tiny", 128, 128), ("tiny", 128, 192), ("tiny-sdxl", 192, 128), ("tiny-sdxl", 128, 128)],
)
def test_steering_pulls_each_caption_into_its_mask(model, height, width):
    engine = tiny_engine(model)
    plain, grids = _attention_shares(engine, two_phrase_request(height, width, 0.0, 0.0))
    steered, _ = _attention_shares(engine, two_phrase_request(height, width, 2.0, 2.0))
    # Attention levels follow the latent grid of a non-square image, not sqrt(pixels).
    assert (height // 16, width // 16) in grids
    for before, after in zip(plain, steered, strict=True):
        assert after > before + 0.1, (plain, steered)
    # Unsteered, the mass in the mask is about the mask's share of the picture.
    assert plain[0] == pytest.approx(1 / 3, abs=0.1)
    assert plain[1] == pytest.approx(1 / 4, abs=0.1)


def test_default_weights_steer_too():
    engine = tiny_engine("tiny")
    plain, _ = _attention_shares(engine, two_phrase_request(128, 192, 0.0, 0.0))
    steered, _ = _attention_shares(engine, two_phrase_request(128, 192, 0.6, 0.9))
    assert all(after > before + 0.05 for before, after in zip(plain, steered, strict=True))


def test_the_steered_unet_compiles_without_graph_breaks():
    """torch.compile (here dynamo alone: the GPU check measures inductor) sees the whole
    steered UNet as one graph: the bias tables are built before the UNet runs."""
    from torch._dynamo.utils import counters

    from psd_collage.engine import load_engine

    torch._dynamo.reset()
    counters.clear()
    engine = load_engine("tiny", device="cpu")
    request = two_phrase_request(64, 64, 0.5, 0.5, steps=3)
    eager = engine.generate(request).images[0]
    engine.components.unet.compile(backend="eager")
    try:
        compiled = engine.generate(request).images[0]
    finally:
        torch._dynamo.reset()
    assert sum(counters["graph_break"].values()) == 0
    np.testing.assert_allclose(compiled, eager, atol=1e-5)

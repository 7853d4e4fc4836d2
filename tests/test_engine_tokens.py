"""Finding layer captions in the prompt: appended when missing, reported when out of reach."""

from __future__ import annotations

import numpy as np
from engine_helpers import random_image, tiny_engine

from psd_collage.engine import GenerationRequest, SteeredPhrase
from psd_collage.engine.tiny_vocab import build_tiny_tokenizer
from psd_collage.engine.tokens import insert_before_captions, locate_captions


def _tokens_at(tokenizer, prompt, span):
    ids = tokenizer(prompt).input_ids
    return tokenizer.convert_ids_to_tokens(ids[span.start : span.start + span.length])


def test_caption_in_prompt_is_found_where_it_is():
    tok = build_tiny_tokenizer()
    prompt, spans, warnings = locate_captions(
        [tok], "A photo of a Red Car on a street", ["red car"]
    )
    assert prompt == "A photo of a Red Car on a street" and warnings == []
    assert _tokens_at(tok, prompt, spans[0]) == ["red</w>", "car</w>"]


def test_missing_captions_are_appended_and_never_share_tokens():
    tok = build_tiny_tokenizer()
    prompt, spans, warnings = locate_captions(
        [tok], "a red car in a city", ["car", "red car", "old tree", None]
    )
    assert prompt == "a red car in a city, car, old tree"
    assert warnings == [] and spans[3] is None
    assert _tokens_at(tok, prompt, spans[1]) == ["red</w>", "car</w>"]
    assert _tokens_at(tok, prompt, spans[0]) == ["car</w>"]
    assert spans[0].start > spans[1].start + 1  # the appended "car", not the one in "red car"
    assert _tokens_at(tok, prompt, spans[2]) == ["old</w>", "tree</w>"]


def test_caption_beyond_the_token_limit_warns_and_is_not_steered():
    tok = build_tiny_tokenizer()
    long_prompt = " ".join(["a big old house"] * 20)  # 80 tokens
    prompt, spans, warnings = locate_captions([tok], long_prompt, ["red car", "big old house"])
    assert prompt.endswith(", red car")
    assert spans[0] is None and spans[1] is not None
    overflow, caption = warnings  # the words CLIP will not read, then the caption lost
    assert "83 tokens long" in overflow and "reads only 75" in overflow
    assert overflow.endswith(
        "'house a big old house, red car' at its end is ignored; shorten the prompt"
    )
    assert "'red car' is past the 75 tokens" in caption and "not steered" in caption


def test_a_prompt_within_the_window_gives_no_warning():
    tok = build_tiny_tokenizer(model_max_length=32)
    prompt = " ".join(["a big old house"] * 7)  # 28 tokens: the window holds 30
    assert locate_captions([tok], prompt, ["big old house"])[2] == []
    assert locate_captions([tok], prompt + " a big", ["big old house"])[2] == []  # 30: full
    assert "31 tokens long" in locate_captions([tok], prompt + " a big old", [])[2][0]


def test_textual_inversion_tokens_are_located():
    tok = build_tiny_tokenizer()
    tok.add_tokens(["<ti-3a9f>"])
    prompt, spans, _ = locate_captions(
        [tok], "a <ti-3a9f> red car on a road", ["<ti-3a9f> red car"]
    )
    assert _tokens_at(tok, prompt, spans[0]) == ["<ti-3a9f>", "red</w>", "car</w>"]


def test_sdxl_uses_both_tokenizers():
    engine = tiny_engine("tiny-sdxl")
    prompt, spans, warnings = locate_captions(engine.components.tokenizers, "a dog", ["blue sky"])
    assert prompt == "a dog, blue sky" and warnings == [] and spans[0].start == 4


def test_generation_reports_the_prompt_it_used_and_unlocatable_captions():
    engine = tiny_engine("tiny")
    h, w = 64, 64
    mask = np.zeros((h, w), np.float32)
    mask[:32] = 1.0
    phrases = [
        SteeredPhrase("yellow boat", mask, 0.6, 0.9),
        SteeredPhrase("hidden layer", np.zeros((h, w), np.float32), 0.6, 0.9),
    ]
    request = GenerationRequest(
        random_image(h, w), np.full((h, w), 0.6, np.float32), "a lake", phrases=phrases, steps=3
    )
    result = engine.generate(request)
    assert result.prompt == "a lake, yellow boat"  # fully hidden layers add nothing
    assert result.warnings == []
    request.prompt = " ".join(["a calm lake"] * 30)
    result = engine.generate(request)
    assert result.prompt.endswith(", yellow boat")
    assert len(result.warnings) == 2  # the words past the window, the caption among them
    assert "is ignored" in result.warnings[0] and "'yellow boat' is past" in result.warnings[1]
    assert len(result.images) == 1


def test_ti_token_goes_before_the_caption_steering_finds():
    """Token level, as steering: ``car`` is not in ``carpet``; case does not matter."""
    tok = build_tiny_tokenizer()
    tok.add_tokens(["<ti-1>", "<ti-2>"])
    assert insert_before_captions([tok], "a red carpet and a car", {"car": "<ti-1>"}) == (
        "a red carpet and a <ti-1> car"
    )
    assert insert_before_captions([tok], "A Red Car", {"red car": "<ti-1>"}) == "A <ti-1> Red Car"
    both = insert_before_captions(
        [tok], "a red car and a red car", {"red car": "<ti-1>", "car": "<ti-2>"}
    )
    assert both == "a <ti-1> red car and a red <ti-2> car"  # the spans steering assigns
    assert insert_before_captions([tok], "a dog", {"blue ball": "<ti-1>"}) == (
        "a dog, <ti-1> blue ball"
    )
    # Steering then finds "<token> caption" once, inside the prompt, with nothing appended.
    prompt = insert_before_captions([tok], "A Red Car", {"red car": "<ti-1>"})
    used, spans, _ = locate_captions([tok], prompt, ["<ti-1> red car"])
    assert used == prompt and spans[0] is not None

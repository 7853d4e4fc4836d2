"""The shipped ``--model shapes`` loads offline by name and follows the light words."""

from __future__ import annotations

import numpy as np

from psd_collage.engine import GenerationRequest, load_engine
from psd_collage.engine.models import PACKAGED_MODELS


def test_shapes_model_ships_in_the_package_and_night_is_darker_than_day():
    assert (PACKAGED_MODELS["shapes"] / "model_index.json").is_file()
    engine = load_engine("shapes", device="cpu")
    assert engine.model_name == "shapes" and engine.native_resolution == 128
    request = GenerationRequest(
        image=np.zeros((128, 128, 3), np.float32),
        strength=np.ones((128, 128), np.float32),
        prompt="",
        seeds=[0, 1],
        steps=20,
    )
    means = {}
    for light in ("in daylight", "at night"):
        request.prompt = f"a white square on snow {light}"
        means[light] = np.mean([image.mean() for image in engine.generate(request).images])
    assert means["at night"] < 0.7 * means["in daylight"], means

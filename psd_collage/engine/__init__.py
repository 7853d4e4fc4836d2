"""The Collage Diffusion engine: model loading, the sampling loop and cross-attention steering.

Knows diffusion, nothing of Photoshop. The render calls :func:`load_engine` once and
:meth:`Engine.generate` per document.
"""

import os

# transformers warns at import time that its image processors lack torchvision (we use
# none of them) and draws a progress bar per model it loads: noise in a designer's terminal
# and in the hot folder's log. The user can still ask for more with TRANSFORMERS_VERBOSITY.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from .api import Engine, GenerationRequest, GenerationResult, SteeredPhrase, load_engine
from .models import (
    ModelComponents,
    build_tiny_components,
    build_tiny_pipeline,
    load_components,
    save_single_file,
)

__all__ = [
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "ModelComponents",
    "SteeredPhrase",
    "build_tiny_components",
    "build_tiny_pipeline",
    "load_components",
    "load_engine",
    "save_single_file",
]

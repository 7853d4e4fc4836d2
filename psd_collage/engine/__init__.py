"""The Collage Diffusion engine: model loading, the sampling loop and cross-attention steering.

Knows diffusion, nothing of Photoshop. The render calls :func:`load_engine` once and
:meth:`Engine.generate` per document.
"""

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

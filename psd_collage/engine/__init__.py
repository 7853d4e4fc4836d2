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

#: Where each public name lives: imported on first use (PEP 562), so that the light
#: modules (``captions``, ``catalog``) load without torch and diffusers.
_HOMES = {
    "Engine": "api",
    "GenerationRequest": "api",
    "GenerationResult": "api",
    "SteeredPhrase": "api",
    "load_engine": "api",
    "ModelComponents": "models",
    "build_tiny_components": "models",
    "build_tiny_pipeline": "models",
    "load_components": "models",
    "save_single_file": "models",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value

"""psd-collage: Collage Diffusion harmonization for layered Photoshop files."""

from .collage import BaseImage, Collage, CollageLayer, DocumentInfo
from .errors import Cancelled, CollageError
from .settings import LayerOptions, Settings

__all__ = [
    "BaseImage",
    "Cancelled",
    "Collage",
    "CollageError",
    "CollageLayer",
    "DocumentInfo",
    "LayerOptions",
    "Settings",
]
__version__ = "0.1.0"

"""psd-collage: Collage Diffusion harmonization for layered Photoshop files."""

from .collage import BaseImage, Collage, CollageLayer, DocumentInfo
from .errors import Cancelled, CollageError
from .psd.reader import read_collage
from .render import Renderer, RenderResult, render_file
from .settings import LayerOptions, Settings

__all__ = [
    "BaseImage",
    "Cancelled",
    "Collage",
    "CollageError",
    "CollageLayer",
    "DocumentInfo",
    "LayerOptions",
    "RenderResult",
    "Renderer",
    "Settings",
    "read_collage",
    "render_file",
]
__version__ = "0.1.0"

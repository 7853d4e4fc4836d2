"""The hot folder: ``psd-collage watch ROOT`` (see docs/design.md section 4).

Designers drop PSD/PSB files into ``ROOT/inbox``; each stable file is claimed
into ``ROOT/work``, harmonized with one warm renderer, and ends in exactly one
of ``ROOT/done`` (original kept in ``ROOT/originals``) or ``ROOT/failed``.
"""

from .layout import Layout
from .service import WatchOptions, WatchService

__all__ = ["Layout", "WatchOptions", "WatchService"]

"""``psd-collage serve ROOT``: an HTTP API and a live status page over the hot folder.

Uploads land in ``ROOT/inbox`` like any dropped file; a backend does the work
(in this process like ``watch``, or a Celery farm) and says what is happening;
:mod:`serve.book` joins the two into the jobs the API shows.
"""

from .backend import Backend, HotFolderBackend
from .book import ApiError, JobBook

__all__ = ["ApiError", "Backend", "JobBook", "HotFolderBackend"]

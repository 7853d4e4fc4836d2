"""The psd-tools boundary: its exceptions, its log output, and its private names.

psd-tools has no exception hierarchy of its own and logs freely; everything that reads
psd-tools objects does so inside :func:`psd_tools_errors` (one readable
:class:`CollageError` naming the file) and :func:`quiet_psd_tools` (its messages become
the collage's warnings instead of reaching the terminal).

psd-tools 1.x keeps a few things we need behind underscored names (a layer's channel
records, the document's parsed structure); the accessors at the end of this module are
the only code that touches them, so a psd-tools upgrade that renames one breaks here.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

from psd_tools import PSDImage
from psd_tools.api.layers import Layer
from psd_tools.compression import PSDDecompressionWarning
from psd_tools.psd import PSD
from psd_tools.psd.layer_and_mask import ChannelData, ChannelInfo, LayerInfo

from ..errors import CollageError

#: Distinct psd-tools messages passed on as warnings; the rest are counted.
MAX_DIAGNOSTICS = 5

#: What psd-tools raises on damaged data (it has no exception hierarchy of its own).
_PSD_TOOLS_ERRORS = (
    struct.error,
    EOFError,
    ValueError,
    IndexError,
    KeyError,
    AssertionError,
    OSError,
    zlib.error,
    OverflowError,
    TypeError,
    AttributeError,
    NotImplementedError,
    RecursionError,
)


@contextlib.contextmanager
def psd_tools_errors(path: Path, what: str) -> Iterator[None]:
    """Turn whatever psd-tools raises on a damaged file into one readable CollageError.

    Keep these blocks around code that reads psd-tools objects, so that our
    own bugs elsewhere still surface as bugs.
    """
    try:
        yield
    except CollageError:
        raise
    except PSDDecompressionWarning as exc:  # raised, not warned, unless lenient
        codec = str(exc).split(" ", 1)[0]
        raise CollageError(
            f"cannot be read ({what}: its {codec} pixel data is damaged); save it again from "
            "Photoshop, or use --lenient to render it with the damaged channel black",
            path=path,
        ) from exc
    except MemoryError:
        raise CollageError(
            f"not enough memory while {what}; close other programs or reduce the canvas size",
            path=path,
        ) from None
    except _PSD_TOOLS_ERRORS as exc:
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise CollageError(
            f"cannot be read ({what}: {detail}); the file may be damaged: save it again "
            "from Photoshop",
            path=path,
        ) from exc


class Diagnostics(logging.Handler):
    """Collects psd-tools' log records and Python warnings instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record.getMessage())

    def add(self, message: str) -> None:
        text = " ".join(str(message).split())[:200]
        if text and text not in self.messages:
            self.messages.append(text)


@contextlib.contextmanager
def quiet_psd_tools(*, lenient: bool = False) -> Iterator[Diagnostics]:
    """A psd-tools warning flood never reaches the user; the distinct ones become warnings.

    Damaged pixel data, which psd-tools replaces with black, is an error unless
    ``lenient``: :func:`psd_tools_errors` names the layer being read.
    """
    logger = logging.getLogger("psd_tools")
    handler = Diagnostics()
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not lenient:
                warnings.simplefilter("error", PSDDecompressionWarning)
            yield handler
        for item in caught:
            handler.add(str(item.message))
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


def diagnostics_as_warnings(diagnostics: Diagnostics) -> list[str]:
    """The first :data:`MAX_DIAGNOSTICS` distinct messages, then how many more there were."""
    shown = diagnostics.messages[:MAX_DIAGNOSTICS]
    out = [f"psd-tools: {message}" for message in shown]
    if len(diagnostics.messages) > len(shown):
        more = len(diagnostics.messages) - len(shown)
        out.append(f"psd-tools: and {more} more messages like these")
    return out


def layer_channels(layer: Layer) -> list[tuple[ChannelInfo, ChannelData]]:
    """A layer's channel records with their stored (still compressed) data, in file order.

    ``layer.numpy()`` decodes and converts; reading the stored samples band by band
    needs the records, which psd-tools 1.x keeps as ``_record`` / ``_channels``.
    """
    return list(zip(layer._record.channel_info, layer._channels, strict=False))


def document_structure(psd: PSDImage) -> PSD:
    """The parsed file under a :class:`PSDImage` (header, resources, merged image data).

    psd-tools 1.x exposes it only as ``_record``.
    """
    return psd._record


def layer_records(document: PSD) -> LayerInfo | None:
    """The layer list the readers consult: Photoshop keeps 16/32-bit layers in an
    Lr16/Lr32 block and leaves the plain section empty; psd-tools' private
    ``_get_layer_info`` picks whichever is used (None when the document has none)."""
    return document._get_layer_info()


def channel_block_length(data: ChannelData) -> int:
    """The length a :class:`ChannelInfo` records for ``data`` (the 2-byte compression
    field included), as psd-tools' private ``_length`` computes it on save."""
    return data._length

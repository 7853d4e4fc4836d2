"""PSD/PSB -> :class:`~psd_collage.collage.Collage`: how a Photoshop file becomes a collage.

This module and the writer are the only ones that import psd_tools. It
implements DESIGN.md section 1: which layers are collage layers, their captions
and options, the prompts, the flattened composite, and the earlier variant an
edit starts from. Compositing is psd-tools' (masks, clipping, blend modes,
adjustments); colour conversion is :mod:`psd_collage.psd.color`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import struct
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psd_tools import PSDImage
from psd_tools.api.layers import AdjustmentLayer, Layer, TypeLayer
from psd_tools.composite import composite as psd_composite
from psd_tools.constants import Resource

from .. import masks
from ..collage import BaseImage, Box, Collage, CollageLayer, DocumentInfo, to_u8
from ..errors import CollageError, IncompleteFile, SettingsError, TagError, UnsupportedDocument
from ..settings import LayerOptions, Settings, parse_tags, split_layer_name
from . import color

#: Name prefix of the groups a render adds; they are output, never input.
HARMONIZED_PREFIX = "[harmonized]"
#: Text layers with these names (any case) hold the prompts, not collage layers.
PROMPT_LAYER = "prompt"
NEGATIVE_LAYER = "negative"

#: Canvas pixels psd-tools composites in one go. Its compositor keeps about ten
#: float32 canvases of the viewport alive (measured: 4.6 GB RSS for one 8000 x
#: 6000 layer, 5.4 GB for the document), so larger viewports go in horizontal
#: bands of at most this many pixels (2 GB for the same document).
BAND_PIXELS = 8_000_000

#: Distinct psd-tools messages passed on as warnings; the rest are counted.
_MAX_DIAGNOSTICS = 5

#: Photoshop's "Lock all" bit in the layer's protection flags ('lspf').
_LOCK_ALL = 0x80000000

_MODE_NAMES = {
    0: "Bitmap",
    1: "GRAYSCALE",
    2: "Indexed Color",
    3: "RGB",
    4: "CMYK",
    7: "Multichannel",
    8: "Duotone",
    9: "Lab Color",
}
_SUPPORTED_MODES = {1: "GRAYSCALE", 3: "RGB", 4: "CMYK"}
_MIN_CHANNELS = {1: 1, 3: 3, 4: 4}
_CONVERT_HINT = {
    0: "Image > Mode > Grayscale, then Image > Mode > RGB Color",
    2: "Image > Mode > RGB Color",
    7: "Image > Mode > RGB Color (or CMYK Color)",
    8: "Image > Mode > RGB Color",
    9: "Image > Mode > RGB Color",
}

#: What a file that is not a PSD starts with, to say what it really is.
_MAGIC = [
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF or Illustrator file"),
    (b"PK\x03\x04", "a ZIP archive (e.g. a Krita .kra or OpenRaster .ora file)"),
    (b"gimp xcf", "a GIMP .xcf file"),
    (b"BM", "a BMP image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"8BIM", "a Photoshop resource file, not an image"),
]


# ---------------------------------------------------------------------------
# The header: cheap checks before psd-tools reads anything
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    version: int  # 1 = PSD, 2 = PSB
    channels: int
    height: int
    width: int
    depth: int
    mode: int


def check_header(path: str | Path, *, max_pixels: int | None = None) -> None:
    """Raise :class:`CollageError` unless ``path`` is a complete PSD/PSB we can render.

    Reads the 26-byte header and the section lengths only (plus the merged
    image's row-length table), so the hot-folder watcher can call it on every
    stable file to tell a half-copied file from a complete one.
    """
    _read_header(Path(path), max_pixels)


def document_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a complete PSD/PSB, from its header (see :func:`check_header`)."""
    header = _read_header(Path(path), None)
    return header.width, header.height


def _read_header(path: Path, max_pixels: int | None) -> _Header:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(26)
            if not (head[:4] == b"8BPS" or (len(head) < 4 and b"8BPS".startswith(head))):
                raise CollageError(_not_psd_message(head, size), path=path)
            if len(head) < 26:  # an empty file or a bare start: a copy that has only begun
                state = "is empty (0 bytes)" if size == 0 else f"is incomplete: only {size} bytes"
                raise IncompleteFile(
                    f"{state}; if it is still being copied wait, "
                    "otherwise save it again from Photoshop",
                    path=path,
                )
            header = _Header(*struct.unpack(">4xH6xHIIHH", head))
            _check_header_fields(path, header, max_pixels)
            _check_complete(path, fh, header, size)
    except FileNotFoundError:
        raise CollageError("file not found", path=path) from None
    except IsADirectoryError:
        raise CollageError("is a folder, not a PSD file", path=path) from None
    except PermissionError:
        raise CollageError("cannot be read: permission denied", path=path) from None
    except OSError as exc:
        raise CollageError(f"cannot be read: {exc.strerror or exc}", path=path) from None
    return header


def _not_psd_message(head: bytes, size: int) -> str:
    if size == 0:
        return "is empty (0 bytes): it is not a Photoshop file; save it again from Photoshop"
    what = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if what is None and head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        what = "a HEIC/AVIF image"
    if what is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        what = "a WebP image"
    if what is None and head and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:16]):
        what = "a text file"
    if what is None:
        return (
            "is not a Photoshop file (no 8BPS signature); open it in Photoshop and "
            "File > Save As... Photoshop (.psd/.psb)"
        )
    return (
        f"is not a Photoshop file: it looks like {what} renamed to .psd; open it in "
        "Photoshop and File > Save As... Photoshop (.psd/.psb)"
    )


def _damaged(path: Path, detail: str) -> CollageError:
    return CollageError(
        f"cannot be read: the file is damaged ({detail}); save it again from Photoshop",
        path=path,
    )


def _check_header_fields(path: Path, h: _Header, max_pixels: int | None) -> None:
    if h.version not in (1, 2):
        raise _damaged(path, f"unknown format version {h.version}")
    limit = 30_000 if h.version == 1 else 300_000
    if not (1 <= h.width <= limit and 1 <= h.height <= limit):
        raise _damaged(path, f"canvas {h.width} x {h.height} px is impossible")
    if not 1 <= h.channels <= 56:
        raise _damaged(path, f"{h.channels} channels")
    if h.mode not in _SUPPORTED_MODES:
        name = _MODE_NAMES.get(h.mode)
        if name is None:
            raise _damaged(path, f"unknown colour mode {h.mode}")
        article = "an" if name[0] in "AEIOU" else "a"
        raise UnsupportedDocument(
            f"is {article} {name} document, which cannot be harmonized; convert it in Photoshop "
            f"with {_CONVERT_HINT[h.mode]} and save again",
            path=path,
        )
    if h.depth not in (8, 16, 32) or h.channels < _MIN_CHANNELS[h.mode]:
        raise _damaged(path, f"{h.depth}-bit {_MODE_NAMES[h.mode]} with {h.channels} channels")
    if max_pixels is not None and h.width * h.height > max_pixels:
        raise UnsupportedDocument(
            f"canvas {h.width} x {h.height} px ({h.width * h.height / 1e6:.1f} megapixels) "
            f"is over the limit of {max_pixels / 1e6:.3g} megapixels; reduce it with "
            "Image > Image Size or raise the limit (--max-pixels, or max_pixels in a sidecar)",
            path=path,
        )


def _check_complete(path: Path, fh: Any, h: _Header, size: int) -> None:
    """Walk the section lengths: a file shorter than they say is incomplete."""

    def incomplete(what: str) -> CollageError:
        return IncompleteFile(
            f"is incomplete: it ends ({size} bytes) inside its {what}; if it is still being "
            "copied wait, otherwise save it again from Photoshop",
            path=path,
        )

    offset = 26
    sections = (("colour data", 4), ("image resources", 4), ("layers", 4 if h.version == 1 else 8))
    for what, width in sections:
        fh.seek(offset)
        raw = fh.read(width)
        if len(raw) < width:
            raise incomplete(what)
        offset += width + int.from_bytes(raw, "big")
        if offset > size:
            raise incomplete(what)
    fh.seek(offset)
    raw = fh.read(2)
    if len(raw) < 2:
        raise incomplete("merged image")
    compression = int.from_bytes(raw, "big")
    offset += 2
    rows = h.channels * h.height
    if compression == 0:  # raw
        offset += rows * ((h.width * h.depth + 7) // 8)
    elif compression == 1:  # PackBits: a table of row lengths, then the rows
        entry = 2 if h.version == 1 else 4
        dtype = ">u2" if entry == 2 else ">u4"
        total = 0
        remaining = rows
        while remaining:
            chunk = min(remaining, 1 << 22)
            raw = fh.read(chunk * entry)
            if len(raw) < chunk * entry:
                raise incomplete("merged image")
            total += int(np.frombuffer(raw, dtype).sum(dtype=np.int64))
            remaining -= chunk
        offset += rows * entry + total
    elif compression not in (2, 3):  # ZIP: its length is not recorded
        raise _damaged(path, f"unknown compression {compression}")
    if offset > size:
        raise incomplete("merged image")


# ---------------------------------------------------------------------------
# psd-tools boundary: its exceptions and its log output
# ---------------------------------------------------------------------------

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
def _psd_tools_errors(path: Path, what: str) -> Iterator[None]:
    """Turn whatever psd-tools raises on a damaged file into one readable CollageError.

    Keep these blocks around code that reads psd-tools objects, so that our
    own bugs elsewhere still surface as bugs.
    """
    try:
        yield
    except CollageError:
        raise
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


class _Diagnostics(logging.Handler):
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
def _quiet_psd_tools() -> Iterator[_Diagnostics]:
    """A psd-tools warning flood never reaches the user; the distinct ones become warnings."""
    logger = logging.getLogger("psd_tools")
    handler = _Diagnostics()
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler
        for item in caught:
            handler.add(str(item.message))
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


# ---------------------------------------------------------------------------
# Names: captions, Photoshop default names, prompts
# ---------------------------------------------------------------------------

# Photoshop's default layer names, per UI language, numbered ("Layer 1").
_NUMBERED_DEFAULTS = [
    # English
    "Layer", "Group", "Set", "Shape", "Ellipse", "Rectangle", "Rounded Rectangle",
    "Polygon", "Line", "Star", "Triangle", "Custom Shape", "Path", "Artboard", "Frame",
    "Color Fill", "Gradient Fill", "Pattern Fill", "Vector Smart Object",
    # German
    "Ebene", "Gruppe", "Form", "Rechteck", "Abgerundetes Rechteck", "Linie", "Stern",
    "Dreieck", "Eigene Form", "Zeichenfläche", "Rahmen", "Farbfüllung", "Verlaufsfüllung",
    "Musterfüllung", "Vektor-Smartobjekt",
    # French
    "Calque", "Groupe", "Forme", "Rectangle arrondi", "Polygone", "Ligne", "Étoile",
    "Forme personnalisée", "Plan de travail", "Cadre",
    # Spanish / Portuguese
    "Capa", "Grupo", "Forma", "Elipse", "Rectángulo", "Rectángulo redondeado", "Polígono",
    "Línea", "Estrella", "Triángulo", "Mesa de trabajo", "Marco", "Camada", "Retângulo",
    "Linha", "Prancheta",
    # Italian
    "Livello", "Gruppo", "Ellisse", "Rettangolo", "Rettangolo arrotondato", "Poligono",
    "Linea", "Stella", "Triangolo", "Tavola da disegno", "Cornice",
    # Dutch, Scandinavian, Finnish
    "Laag", "Groep", "Vorm", "Ellips", "Rechthoek", "Tekengebied", "Lager", "Grupp",
    "Rektangel", "Rityta", "Lag", "Figur", "Taso", "Ryhmä", "Muoto",
    # Polish, Czech, Hungarian, Turkish
    "Warstwa", "Grupa", "Kształt", "Elipsa", "Prostokąt", "Obszar roboczy", "Vrstva",
    "Skupina", "Tvar", "Obdélník", "Réteg", "Csoport", "Alakzat", "Katman", "Grup",
    "Şekil", "Elips", "Dikdörtgen", "Çalışma Yüzeyi",
    # Russian, Ukrainian
    "Слой", "Группа", "Фигура", "Эллипс", "Прямоугольник", "Многоугольник", "Линия",
    "Монтажная область", "Рамка", "Шар", "Група", "Фігура",
    # Japanese, Chinese, Korean
    "レイヤー", "グループ", "シェイプ", "楕円形", "長方形", "角丸長方形", "多角形", "ライン",
    "アートボード", "フレーム", "图层", "组", "形状", "椭圆", "矩形", "圆角矩形", "多边形",
    "直线", "画板", "圖層", "群組", "形狀", "橢圓", "工作區域", "레이어", "그룹", "모양",
    "타원", "사각형", "대지",
]  # fmt: skip
# Names Photoshop gives without a number.
_PLAIN_DEFAULTS = [
    "Background", "Hintergrund", "Arrière-plan", "Fondo", "Sfondo", "Plano de fundo",
    "Achtergrond", "Bakgrund", "Baggrund", "Bakgrunn", "Tausta", "Tło", "Pozadí", "Háttér",
    "Arka Plan", "Фон", "Тло", "背景", "배경", "Vector Smart Object", "Vektor-Smartobjekt",
]  # fmt: skip
_COPY_WORDS = [
    "copy", "kopie", "copie", "copia", "cópia", "kopia", "kopio", "kopya", "másolat",
    "копия", "копія", "のコピー", "コピー", "拷贝", "拷貝", "복사",
]  # fmt: skip


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_DEFAULT_NAME = re.compile(
    rf"^(?:(?:{_alternation(_NUMBERED_DEFAULTS)})\s*\d+|(?:{_alternation(_PLAIN_DEFAULTS)}))"
    rf"(?:\s*\(?(?:{_alternation(_COPY_WORDS)})\)?(?:\s*\d+)?)*$",
    re.IGNORECASE,
)


def is_default_name(caption: str) -> bool:
    """``Layer 1``, ``Background copy``, ``Ebene 2 Kopie``, ``レイヤー 1``... carry no meaning."""
    return bool(_DEFAULT_NAME.match(" ".join(caption.split())))


def _clean_text(text: str) -> str:
    """Photoshop text: ``\\r`` line breaks and ``\\x03`` soft breaks -> one line."""
    return " ".join(re.sub(r"[\r\n\x03\u2028\u2029]+", " ", text).split())


_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_DC = "http://purl.org/dc/elements/1.1/"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def xmp_description(data: bytes | None) -> str:
    """File > File Info > Description (XMP ``dc:description``), or ``""``."""
    if not data or b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        return ""  # no entity expansion from an untrusted file
    try:
        root = ET.fromstring(data.strip(b"\x00\r\n\t "))
    except ET.ParseError:
        return ""
    for desc in root.iter(f"{{{_DC}}}description"):
        items = desc.findall(f".//{{{_RDF}}}li")
        items.sort(key=lambda li: li.get(_XML_LANG) != "x-default")
        texts = ["".join(li.itertext()) for li in items] or ["".join(desc.itertext())]
        for text in texts:
            if text.strip():
                return _clean_text(text)
    for node in root.iter(f"{{{_RDF}}}Description"):
        text = node.get(f"{{{_DC}}}description", "")
        if text.strip():
            return _clean_text(text)
    return ""


# ---------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------


@dataclass
class _Item:
    """A collage layer to be: which PSD layer or group, and what it means."""

    layer: Layer
    caption: str
    options: LayerOptions
    sources: list[str] = field(default_factory=list)


_DEFAULT_SETTINGS = Settings()  # frozen: safe to share as a default


def read_collage(path: str | Path, settings: Settings = _DEFAULT_SETTINGS) -> Collage:
    """Read a PSD/PSB into a :class:`Collage` (DESIGN.md section 1).

    Bad input raises a :class:`CollageError` subclass with a one-line message
    naming the file; nothing psd-tools prints reaches the user.
    """
    path = Path(path)
    header = _read_header(path, settings.max_pixels)
    with _quiet_psd_tools() as diagnostics:
        with _psd_tools_errors(path, "opening it"):
            psd = PSDImage.open(path)
        if len(psd) == 0:
            raise UnsupportedDocument(
                "has no layers (a flattened image): add at least one layer in Photoshop "
                "and save again",
                path=path,
            )
        collage = _Reader(path, psd, header, settings).read()
    shown = diagnostics.messages[:_MAX_DIAGNOSTICS]
    collage.warnings.extend(f"psd-tools: {message}" for message in shown)
    if len(diagnostics.messages) > len(shown):
        more = len(diagnostics.messages) - len(shown)
        collage.warnings.append(f"psd-tools: and {more} more messages like these")
    return collage


class _Reader:
    def __init__(self, path: Path, psd: PSDImage, header: _Header, settings: Settings) -> None:
        self.path = path
        self.psd = psd
        self.settings = settings
        self.mode = _SUPPORTED_MODES[header.mode]
        self.depth = header.depth
        self.size = (header.width, header.height)
        self.warnings: list[str] = []
        self.excluded: set[int] = set()  # id() of layers left out of every composite
        self.items: list[_Item] = []
        self.prompt_layers: dict[str, list[TypeLayer]] = {PROMPT_LAYER: [], NEGATIVE_LAYER: []}
        self.harmonized: list[Layer] = []  # top-level [harmonized] groups, bottom to top
        self.sidecar_used: set[str] = set()
        with _psd_tools_errors(path, "reading its image resources"):
            resources = psd.image_resources
            self.icc: bytes | None = resources.get_data(Resource.ICC_PROFILE) or None
            self.xmp: bytes | None = resources.get_data(Resource.XMP_METADATA) or None

    # -- the walk ----------------------------------------------------------

    def read(self) -> Collage:
        with _psd_tools_errors(self.path, "reading its layers"):
            self._find_special_layers()
            self._walk(self.psd, LayerOptions(), collect=True)
        self._check_sidecar_keys()
        self._check_colour_profile()
        layers = [layer for item in self.items if (layer := self._collage_layer(item))]
        if not layers and not self.harmonized:
            raise UnsupportedDocument(
                "has no visible layers with pixels (all hidden, [skip] or empty): show at "
                "least one layer in Photoshop and save again",
                path=self.path,
            )
        unnamed = [layer.name for layer in layers if not layer.caption]
        if unnamed:
            names = ", ".join(repr(name) for name in unnamed[:8])
            more = f" and {len(unnamed) - 8} more" if len(unnamed) > 8 else ""
            self.warnings.append(
                f"{len(unnamed)} layer(s) have a default Photoshop name ({names}{more}): they "
                "stay in the picture but are not steered; rename them to say what they show"
            )
        masks.assign_visible_masks(layers, self.size)
        for layer in layers:
            layer.steered = bool(layer.caption) and layer.visible_area >= self.settings.min_area
            if layer.caption and not layer.steered:
                self.warnings.append(
                    f"layer {layer.name!r} shows only {layer.visible_area:.1%} of the canvas "
                    f"(under {self.settings.min_area:.0%}): it is rendered but not steered"
                )
        document = DocumentInfo(
            path=self.path,
            width=self.size[0],
            height=self.size[1],
            color_mode=self.mode,
            depth=self.depth,
            psb=self.psd.version == 2,
        )
        prompt = self._prompt(layers)
        negative = self._negative()
        composite = self._flatten()
        base = self._base()
        collage = Collage(
            document=document,
            prompt=prompt,
            negative_prompt=negative,
            layers=layers,
            composite=composite,
            base=base,
            warnings=self.warnings,
        )
        if any(layer.redo for layer in layers) and base is None:
            self.warnings.append(
                "layers are tagged [redo] but no [harmonized] variant is visible: the whole "
                "collage is rendered; show the variant you want to edit"
            )
        return collage

    def _find_special_layers(self) -> None:
        """Prompt text layers (hidden or not) and [harmonized] groups, anywhere."""
        for layer in self.psd.descendants():
            name = layer.name.strip()
            if isinstance(layer, TypeLayer) and name.lower() in self.prompt_layers:
                self.prompt_layers[name.lower()].append(layer)
                self.excluded.add(id(layer))
            elif layer.is_group() and name.startswith(HARMONIZED_PREFIX):
                self.excluded.add(id(layer))
                if layer.parent is self.psd:
                    self.harmonized.append(layer)

    def _walk(self, group: Any, inherited: LayerOptions, *, collect: bool) -> None:
        """Visit ``group``'s children back to front.

        ``collect``: children become collage layers (top level, or a [split]
        group); otherwise they are only checked for [skip] and bad tags, as
        parts of their group's composite.
        """
        for layer in group:
            if id(layer) in self.excluded or not layer.visible:
                continue  # prompt text, [harmonized], hidden: out of collage and composite
            if isinstance(layer, AdjustmentLayer):
                continue  # changes the composite below it, never a collage layer
            caption, options, tags = self._options(layer, inherited)
            if options.skip:
                self.excluded.add(id(layer))
                continue
            if layer.clipping:
                continue  # part of the layer it clips to
            if not collect:
                if layer.is_group():
                    self._walk(layer, LayerOptions(), collect=False)
                if _meaningful(tags):
                    self.warnings.append(
                        f"layer {layer.name!r}: its tags have no effect inside group "
                        f"{group.name!r}; tag the group [split] to make it a layer of its own"
                    )
                continue
            if layer.is_group() and options.split:
                children = dataclasses.replace(options, split=None, skip=None)
                self._walk(layer, children, collect=True)
                continue
            if layer.is_group():
                self._walk(layer, LayerOptions(), collect=False)
            self.items.append(_Item(layer, caption, options))

    def _options(
        self, layer: Layer, inherited: LayerOptions
    ) -> tuple[str, LayerOptions, LayerOptions]:
        """Caption, options and the name's own tags.

        Precedence: Photoshop lock < enclosing [split] group < tags < sidecar.
        """
        caption, block = split_layer_name(layer.name)
        tags = LayerOptions()
        if block is not None:
            try:
                tags = parse_tags(block, layer=layer.name)
            except TagError as exc:
                raise TagError(exc.detail, path=self.path) from None
        options = LayerOptions(lock=True) if _photoshop_locked(layer) else LayerOptions()
        options = options.merged(inherited).merged(tags)
        for key in (caption, layer.name):  # the full name is more specific: it wins
            if key in self.settings.layers:
                options = options.merged(self.settings.layers[key])
                self.sidecar_used.add(key)
        if is_default_name(caption):
            caption = ""
        return caption, options, tags

    def _check_sidecar_keys(self) -> None:
        unused = [key for key in self.settings.layers if key not in self.sidecar_used]
        if not unused:
            return
        names = {layer.name for layer in self.psd.descendants()}
        names |= {split_layer_name(name)[0] for name in names}
        unused = [key for key in unused if key not in names]  # hidden/nested: fine
        if unused:
            known = ", ".join(repr(n) for n in sorted(names)[:12])
            raise SettingsError(
                f'settings [layers."{unused[0]}"] matches no layer of this document '
                f"(its layers: {known}); fix the name in the sidecar",
                path=self.path,
            )

    def _check_colour_profile(self) -> None:
        if self.mode == "CMYK" and self.icc is None:
            self.warnings.append(
                "CMYK document without an embedded colour profile: converted with a simple "
                "formula; embed one (Edit > Assign Profile, save with ICC Profile checked)"
            )
        elif self.icc is not None and not color.profile_name(self.icc):
            self.warnings.append(
                "the embedded colour profile cannot be read: colours are converted as if sRGB "
                "(or with a simple formula for CMYK)"
            )

    # -- one collage layer ---------------------------------------------------

    def _collage_layer(self, item: _Item) -> CollageLayer | None:
        layer = item.layer
        name = layer.name
        with _psd_tools_errors(self.path, f"compositing layer {name!r}"):
            viewport = _intersect(_paint_box(layer), (0, 0, *self.size))
            if viewport is None:
                rendered = None
            elif self._is_plain(layer):
                rendered = self._render_plain(layer, viewport)
            else:
                rendered = self._render(layer, viewport, opaque=False)
            sources = self._sources(layer)
        if rendered is None or not rendered[..., 3].any():
            self.warnings.append(f"layer {name!r} is empty (no visible pixels): left out")
            return None
        pixels, box = _trim(rendered, viewport)
        options = item.options
        noise = self.settings.noise if options.noise is None else options.noise
        return CollageLayer(
            name=name,
            caption=item.caption,
            options=options,
            pixels=pixels,
            box=box,
            sources=sources,
            noise=0.0 if options.lock else float(noise),
        )

    def _sources(self, layer: Layer) -> list[str]:
        """The PSD layers whose pixels this collage layer holds."""
        if layer.is_group():
            parts = [
                d.name
                for d in layer.descendants()
                if not d.is_group() and self._accept(d) and not self._excluded_above(d, layer)
            ]
        else:
            parts = [layer.name]
        clips = [c.name for c in layer.clip_layers if self._accept(c)]
        return parts + clips

    def _excluded_above(self, layer: Layer, top: Layer) -> bool:
        parent = layer.parent
        while parent is not None and parent is not top:
            if id(parent) in self.excluded:
                return True
            parent = parent.parent
        return False

    # -- compositing ----------------------------------------------------------

    def _accept(self, layer: Layer) -> bool:
        """psd-tools' layer filter: visible, and not left out by us."""
        return layer.is_visible() and id(layer) not in self.excluded

    def _render(self, target: Any, viewport: Box, *, opaque: bool) -> np.ndarray:
        """psd-tools' composite of ``target`` over ``viewport`` as uint8 sRGB.

        Returns (h, w, 4) RGBA, or (h, w, 3) RGB flattened over white when
        ``opaque``. Large viewports go in bands (see :data:`BAND_PIXELS`).
        """
        left, top, right, bottom = viewport
        width = right - left
        out = np.empty((bottom - top, width, 3 if opaque else 4), np.uint8)
        rows = max(1, BAND_PIXELS // max(width, 1))
        as_layer = target is not self.psd
        for y in range(top, bottom, rows):
            band = (left, y, right, min(bottom, y + rows))
            # Over a transparent backdrop, as Photoshop composites; flattening over
            # white comes after (an opaque backdrop would change non-normal blend modes).
            native, _, alpha = psd_composite(
                target,
                color=1.0,
                alpha=0.0,
                viewport=band,
                layer_filter=self._accept,
                as_layer=as_layer,
            )
            rows_out = out[y - top : band[3] - top]
            if opaque:
                rows_out[...] = self._to_srgb8(native * alpha + (1.0 - alpha))
            else:
                rows_out[..., :3] = self._to_srgb8(native)
                rows_out[..., 3] = to_u8(alpha[..., 0])
        return out

    def _is_plain(self, layer: Layer) -> bool:
        """A pixel layer with nothing on it but opacity: no mask, effect or clipping."""
        return (
            layer.kind == "pixel"
            and layer.has_pixels()
            and not layer.has_mask()
            and not layer.has_vector_mask()
            and not layer.has_effects()
            and not any(self._accept(clip) for clip in layer.clip_layers)
        )

    def _render_plain(self, layer: Layer, viewport: Box) -> np.ndarray:
        """A plain layer's own composite: its stored pixels, alpha times its opacities.

        The same result as :meth:`_render` (tests compare them on the Photoshop
        fixtures; blend modes do not act on a transparent backdrop), but one
        decode of the layer instead of one per band: for a full-canvas 8000 x
        6000 photo layer, 4 s instead of 30 s.
        """
        color = layer.numpy("color")
        shape = layer.numpy("shape")
        factor = (layer.opacity / 255.0) * (layer.fill_opacity / 255.0)
        left, top, right, bottom = viewport
        x, y = left - layer.left, top - layer.top
        width, height = right - left, bottom - top
        out = np.empty((height, width, 4), np.uint8)
        rows = max(1, BAND_PIXELS // width)
        for start in range(0, height, rows):
            stop = min(height, start + rows)
            band = (slice(y + start, y + stop), slice(x, x + width))
            out[start:stop, :, :3] = self._to_srgb8(color[band])
            alpha = shape[band][..., 0] if shape is not None else np.ones(1, np.float32)
            out[start:stop, :, 3] = to_u8(alpha * np.float32(factor))
        return out

    def _to_srgb8(self, native: np.ndarray) -> np.ndarray:
        """Document channels (float, psd-tools' convention) -> uint8 sRGB, via color.py."""
        # 32-bit documents hold HDR values: we tone-map them by clipping to [0, 1],
        # which to_u8 (and color.py's CMYK path) do on the way to 8 bits.
        if self.mode == "CMYK":
            # psd-tools keeps the file's convention (1 = no ink); color.py takes PIL's (0 = no ink).
            native = 1.0 - native
        return to_u8(color.to_srgb(native, self.mode, self.icc))

    def _flatten(self) -> np.ndarray:
        """The flattened collage, (H, W, 3) uint8 sRGB over white."""
        with _psd_tools_errors(self.path, "compositing the document"):
            merged = self._stored_composite()
            if merged is not None:
                return merged
            return self._render(self.psd, (0, 0, *self.size), opaque=True)

    def _stored_composite(self) -> np.ndarray | None:
        """Photoshop's own merged image, when it shows exactly the collage.

        It is exact (effects psd-tools does not draw included) and costs one
        decode instead of a composite. Not usable when we leave out something
        visible ([skip], [harmonized], a visible prompt text layer), when the
        file says it has none ("Maximize Compatibility" off), or when it is
        blank, as some non-Adobe writers leave it.
        """
        psd = self.psd
        if not psd.has_preview() or psd.is_updated():
            return None
        if any(layer.is_visible() and id(layer) in self.excluded for layer in psd.descendants()):
            return None
        native = psd.numpy("color")
        if float(native.min()) == float(native.max()):
            return None
        shape = psd.numpy("shape")
        transparent = float(shape.min()) < 1.0
        out = np.empty((*native.shape[:2], 3), np.uint8)
        rows = max(1, BAND_PIXELS // self.size[0])
        for y in range(0, self.size[1], rows):
            part = native[y : y + rows]
            if transparent:  # over white
                cover = shape[y : y + rows]
                part = part * cover + (1.0 - cover)
            out[y : y + rows] = self._to_srgb8(part)
        return out

    def _base(self) -> BaseImage | None:
        """The visible variant of the top-most [harmonized] group: what an edit starts from."""
        if not self.harmonized:
            return None
        group = self.harmonized[-1]
        if not group.visible:
            return None
        variants = [c for c in group if c.visible and c.kind == "pixel" and c.has_pixels()]
        if not variants:
            return None
        chosen = variants[-1]
        if len(variants) > 1:
            self.warnings.append(
                f"several variants are visible in {group.name!r}: editing the top-most, "
                f"{chosen.name!r}; hide the others"
            )
        with _psd_tools_errors(self.path, f"reading variant {chosen.name!r}"):
            pixels = self._render(chosen, (0, 0, *self.size), opaque=True)
        return BaseImage(layer=chosen.name, group=group.name, pixels=pixels)

    # -- prompts --------------------------------------------------------------

    def _text_of(self, kind: str) -> str | None:
        found = self.prompt_layers[kind]
        if not found:
            return None
        if len(found) > 1:
            self.warnings.append(
                f"{len(found)} text layers are named {kind!r}: using the top-most one"
            )
        with _psd_tools_errors(self.path, f"reading the {kind!r} text layer"):
            return _clean_text(found[-1].text)

    def _prompt(self, layers: list[CollageLayer]) -> str:
        prompt = self.settings.prompt
        if prompt is None:
            prompt = self._text_of(PROMPT_LAYER) or None
        if prompt is None:
            prompt = xmp_description(self.xmp) or None
        if prompt is None:
            prompt = ", ".join(layer.caption for layer in layers if layer.caption)
            if prompt:
                self.warnings.append(
                    f"no prompt (no 'prompt' text layer, File Info description or sidecar "
                    f"prompt): using the layer captions: {prompt!r}"
                )
            else:
                self.warnings.append(
                    "no prompt and no captions: add a text layer named 'prompt' describing "
                    "the picture"
                )
        suffix = self.settings.prompt_suffix.strip()
        if suffix:
            prompt = f"{prompt.rstrip(', ')}, {suffix}" if prompt.strip() else suffix
        return prompt.strip()

    def _negative(self) -> str:
        if self.settings.negative is not None:
            return self.settings.negative.strip()
        return self._text_of(NEGATIVE_LAYER) or ""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _photoshop_locked(layer: Layer) -> bool:
    """Photoshop's "Lock all" (layer or an enclosing group): the 'lspf' top bit."""
    node: Any = layer
    while node is not None and isinstance(node, Layer):
        locks = node.locks
        if locks is not None and int(locks.value) & _LOCK_ALL:
            return True
        node = node.parent
    return False


def _meaningful(options: LayerOptions) -> bool:
    """Options that would change a collage layer (skip is honoured anywhere)."""
    return bool(dataclasses.replace(options, skip=None).as_dict())


def _paint_box(layer: Layer) -> Box:
    """The layer's box grown by its stroke effects, the one effect drawn outside it."""
    left, top, right, bottom = layer.bbox
    if right <= left or bottom <= top:
        return (0, 0, 0, 0)
    reach = 0.0
    nodes = [layer, *layer.descendants()] if layer.is_group() else [layer]
    for node in nodes:
        if node.has_effects():
            for stroke in node.effects.find("stroke"):
                reach = max(reach, float(stroke.size))
    pad = int(np.ceil(reach))
    return (left - pad, top - pad, right + pad, bottom + pad)


def _intersect(a: Box, b: Box) -> Box | None:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[2] and box[1] < box[3] else None


def _trim(rgba: np.ndarray, viewport: Box) -> tuple[np.ndarray, Box]:
    """Crop to the pixels with any alpha, so a layer costs the size of its object."""
    alpha = rgba[..., 3]
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pixels = np.ascontiguousarray(rgba[top:bottom, left:right])
    x, y = viewport[0], viewport[1]
    return pixels, (int(x + left), int(y + top), int(x + right), int(y + bottom))


__all__ = [
    "HARMONIZED_PREFIX",
    "NEGATIVE_LAYER",
    "PROMPT_LAYER",
    "check_header",
    "is_default_name",
    "read_collage",
    "xmp_description",
]

"""PSD/PSB -> :class:`~psd_collage.collage.Collage`: how a Photoshop file becomes a collage.

It implements docs/design.md section 1: which layers are collage layers, their
captions and options, the prompts, and the earlier variant an edit starts from. The
rest of the psd package does the parts: :mod:`.header` (cheap checks first),
:mod:`.boundary` (psd-tools' errors and log), :mod:`.names` (meaningful names),
:mod:`.xmp`, :mod:`.composite` (drawing layers with psd-tools) and :mod:`.color`.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psd_tools import PSDImage
from psd_tools.api.layers import AdjustmentLayer, Layer, TypeLayer
from psd_tools.constants import Resource

from .. import masks
from ..collage import BaseImage, Collage, CollageLayer, DocumentInfo
from ..errors import Cancelled, SettingsError, TagError, UnsupportedDocument
from ..settings import LayerOptions, Settings, bracket_problem, parse_tags, split_layer_name
from . import color
from .boundary import diagnostics_as_warnings, psd_tools_errors, quiet_psd_tools
from .composite import Compositor
from .header import SUPPORTED_MODES, Header, read_header
from .history import read_renders
from .names import HARMONIZED_PREFIX, NEGATIVE_LAYER, PROMPT_LAYER, clean_text, is_default_name
from .xmp import xmp_description

#: Photoshop's "Lock all" bit in the layer's protection flags ('lspf').
_LOCK_ALL = 0x80000000

#: The noise source of a type layer below the output that is not tagged in: kept exactly.
TYPE_KEPT = "type layer (kept)"


@dataclass
class _Item:
    """A collage layer to be: which PSD layer or group, and what it means."""

    layer: Layer
    caption: str
    options: LayerOptions
    sources: list[str] = field(default_factory=list)
    noise_source: str = "default"  # tag, sidecar, Photoshop lock, [split] group or default
    text: bool = False  # a type layer not tagged in: kept as it is, or live above the output


_DEFAULT_SETTINGS = Settings()  # frozen: safe to share as a default


def read_collage(
    path: str | Path,
    settings: Settings = _DEFAULT_SETTINGS,
    *,
    cancel: Callable[[], bool] | None = None,
) -> Collage:
    """Read a PSD/PSB into a :class:`Collage` (docs/design.md section 1).

    Bad input raises a :class:`CollageError` subclass with a one-line message
    naming the file; nothing psd-tools prints reaches the user. ``cancel`` is asked
    before each layer is drawn (a job timeout covers reading): :class:`Cancelled`.
    """
    path = Path(path)
    header = read_header(path, settings.max_pixels)
    with quiet_psd_tools(lenient=settings.lenient) as diagnostics:
        with psd_tools_errors(path, "opening it"):
            psd = PSDImage.open(path)
            check_layer_sizes(psd, path, settings.max_pixels)
        if len(psd) == 0:
            raise UnsupportedDocument(
                "has no layers (a flattened image): add at least one layer in Photoshop "
                "and save again",
                path=path,
            )
        reader = _Reader(path, psd, header, settings, cancel)
        del psd  # the reader lets go of it half-way (see _Reader._release_document)
        collage = reader.read()
    collage.warnings.extend(diagnostics_as_warnings(diagnostics))
    return collage


def check_layer_sizes(psd: PSDImage, path: Path, max_pixels: int) -> None:
    """Refuse a layer or layer mask larger than ``max_pixels`` before any pixel is decoded.

    Memory follows the boxes the file declares, not its size: a 670 KB file can hold a
    13000 x 13000 ZIP layer on a 64 x 64 canvas. So each box is held to the same limit
    as the canvas, and reading never decodes more than ``max_pixels`` per layer.
    """
    for layer in psd.descendants():
        if layer.is_group():
            continue
        boxes = [("layer", layer.width, layer.height)]
        if layer.has_mask() and layer.mask is not None:
            boxes.append(("mask of layer", layer.mask.width, layer.mask.height))
        for what, width, height in boxes:
            if max(width, 0) * max(height, 0) > max_pixels:
                raise UnsupportedDocument(
                    f"the {what} {clean_text(layer.name)!r} is {width} x {height} px "
                    f"({width * height / 1e6:.3g} megapixels), over the limit max_pixels="
                    f"{max_pixels} (the operator's setting, --max-pixels); crop it to the "
                    "canvas in Photoshop (Image > Crop, Delete Cropped Pixels) and save again",
                    path=path,
                )


class _Reader:
    def __init__(
        self,
        path: Path,
        psd: PSDImage,
        header: Header,
        settings: Settings,
        cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.path = path
        self.cancel = cancel
        self.psd = psd
        self.settings = settings
        self.mode = SUPPORTED_MODES[header.mode]
        self.depth = header.depth
        self.size = (header.width, header.height)
        self.warnings: list[str] = []
        self.excluded: set[int] = set()  # id() of layers left out of every composite
        self.items: list[_Item] = []
        self.prompt_layers: dict[str, list[TypeLayer]] = {PROMPT_LAYER: [], NEGATIVE_LAYER: []}
        self.harmonized: list[Layer] = []  # top-level [harmonized] groups, bottom to top
        self.sidecar_used: set[str] = set()
        with psd_tools_errors(path, "reading its image resources"):
            resources = psd.image_resources
            self.icc: bytes | None = resources.get_data(Resource.ICC_PROFILE) or None
            self.xmp: bytes | None = resources.get_data(Resource.XMP_METADATA) or None
        self.compositor = Compositor(psd, self.mode, self.icc, self.excluded)

    # -- the walk ----------------------------------------------------------

    def read(self) -> Collage:
        with psd_tools_errors(self.path, "reading its layers"):
            self._find_special_layers()
            self._walk(self.psd, LayerOptions(), collect=True)
        self._check_sidecar_keys()
        self._check_colour_profile()
        output_at, live = self._place_output()
        live_names = [layer.name for layer in live]
        layers = [layer for item in self.items if (layer := self._collage_layer(item))]
        if not layers and not self.harmonized:
            raise UnsupportedDocument(
                "has no visible layers with pixels (all hidden, [skip] or empty): show at "
                "least one layer in Photoshop and save again",
                path=self.path,
            )
        self._warn_unnamed(layers)
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
        self._check_cancel()
        composite = self._flatten()
        base = self._base()
        overlay = self._overlay(live)
        earlier_groups = [group.name for group in self.harmonized]
        del live
        self._release_document()
        masks.assign_visible_masks(layers, self.size)
        for layer in layers:
            layer.steered = bool(layer.caption) and layer.visible_area >= self.settings.min_area
            if layer.caption and not layer.steered:
                self.warnings.append(
                    f"layer {layer.name!r} shows only {layer.visible_area:.1%} of the canvas "
                    f"(under {self.settings.min_area:.0%}): it is rendered but not steered"
                )
        collage = Collage(
            document=document,
            prompt=prompt,
            negative_prompt=negative,
            layers=layers,
            composite=composite,
            base=base,
            warnings=self.warnings,
            background_noise=self.settings.noise,
            earlier_groups=earlier_groups,
            renders=read_renders(self.xmp),
            output_at=output_at,
            live_above=live_names,
            overlay=overlay,
        )
        if any(layer.redo for layer in layers) and base is None:
            self.warnings.append(
                "layers are tagged [redo] but no [harmonized] variant is visible: the whole "
                "collage is rendered; show the variant you want to edit"
            )
        return collage

    def _release_document(self) -> None:
        """Drop psd-tools' document once every pixel is drawn, before the visible masks.

        It holds the whole file in memory (about 500 MB for an 8000 x 6000 poster of
        10 layers); its layers reference each other, hence the collection.
        """
        self.psd = None  # type: ignore[assignment]
        self.compositor = None  # type: ignore[assignment]
        self.items, self.harmonized = [], []
        self.prompt_layers = {kind: [] for kind in self.prompt_layers}
        gc.collect()

    def _warn_unnamed(self, layers: list[CollageLayer]) -> None:
        unnamed = [
            layer.name for layer in layers if not layer.caption and layer.noise_source != TYPE_KEPT
        ]
        if unnamed:
            names = ", ".join(repr(name) for name in unnamed[:8])
            more = f" and {len(unnamed) - 8} more" if len(unnamed) > 8 else ""
            if len(unnamed) == 1:
                self.warnings.append(
                    f"layer {names} has a default Photoshop name: it stays in the picture but "
                    "is not steered; rename it to say what it shows"
                )
                return
            self.warnings.append(
                f"{len(unnamed)} layers have a default Photoshop name ({names}{more}): they "
                "stay in the picture but are not steered; rename them to say what they show"
            )

    def _place_output(self) -> tuple[int | None, list[Layer]]:
        """Where the output group goes, and the layers that stay live above it.

        It goes directly above the top-most top-level layer that took part: a collage
        layer (or the group holding it), an adjustment layer (applied to the picture),
        an earlier ``[harmonized]`` group, and the layers clipped to it. Type layers not
        tagged in that lie above it stay live on top (left out of the picture); those
        below it are kept exactly. Returns (top-level layers below the output, or None
        for the very top; the live layers above it).
        """
        top_level = list(self.psd)
        position = {id(layer): index for index, layer in enumerate(top_level)}

        def top_index(layer: Any) -> int:
            while layer.parent is not None and layer.parent is not self.psd:
                layer = layer.parent
            return position[id(layer)]

        took_part = [top_index(item.layer) for item in self.items if not item.text]
        took_part += [position[id(group)] for group in self.harmonized]
        took_part += [
            index
            for index, layer in enumerate(top_level)
            if isinstance(layer, AdjustmentLayer) and layer.visible
        ]
        top = max(took_part, default=len(top_level) - 1)
        while top + 1 < len(top_level) and top_level[top + 1].clipping:
            top += 1
        live = [item.layer for item in self.items if item.text and top_index(item.layer) > top]
        self.items = [item for item in self.items if item.layer not in live]
        self.excluded.update(id(layer) for layer in live)
        return (None if top + 1 >= len(top_level) else top + 1), live

    def _overlay(self, live: list[Layer]) -> np.ndarray | None:
        """The live layers above the output as one RGBA sRGB image, for the merged image."""
        if not live:
            return None
        shown = {id(node) for layer in live for node in [layer, *_ancestors(layer)]}
        with psd_tools_errors(self.path, "compositing the layers above the output"):
            return self.compositor.render(self.psd, (0, 0, *self.size), opaque=False, only=shown)

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
            caption, options, tags, noise_source = self._options(layer, inherited)
            if collect and (problem := bracket_problem(layer.name)):
                self.warnings.append(f"layer {layer.name!r}: {problem}")
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
            if isinstance(layer, TypeLayer) and split_layer_name(layer.name)[1] is None:
                # Live type: not a collage layer unless tagged in (see _place_output).
                options, noise_source = dataclasses.replace(options, lock=True), TYPE_KEPT
                self.items.append(_Item(layer, "", options, noise_source=noise_source, text=True))
                continue
            self.items.append(_Item(layer, caption, options, noise_source=noise_source))

    def _options(
        self, layer: Layer, inherited: LayerOptions
    ) -> tuple[str, LayerOptions, LayerOptions, str]:
        """Caption, options, the name's own tags, and where the noise level came from.

        Precedence: Photoshop lock < enclosing [split] group < tags < sidecar.
        """
        caption, block = split_layer_name(layer.name)
        tags = LayerOptions()
        if block is not None:
            try:
                tags = parse_tags(block, layer=layer.name)
            except TagError as exc:
                raise TagError(exc.detail, path=self.path) from None
        locked = LayerOptions(lock=True) if _photoshop_locked(layer) else LayerOptions()
        steps = [("Photoshop lock", locked), ("[split] group", inherited), ("tag", tags)]
        for key in (caption, layer.name):  # the full name is more specific: it wins
            if key in self.settings.layers:
                steps.append(("sidecar", self.settings.layers[key]))
                self.sidecar_used.add(key)
        options, source = LayerOptions(), "default"
        for name, step in steps:
            options = options.merged(step)
            if step.noise is not None or step.lock is not None:
                source = name
        if is_default_name(caption):
            caption = ""
        return caption, options, tags, source

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
        self._check_cancel()
        with psd_tools_errors(self.path, f"compositing layer {layer.name!r}"):
            drawn = self.compositor.layer_pixels(layer)
            sources = self._sources(layer)
        if drawn is None:
            self.warnings.append(f"layer {layer.name!r} is empty (no visible pixels): left out")
            return None
        pixels, box = drawn
        options = item.options
        noise = self.settings.noise if options.noise is None else options.noise
        return CollageLayer(
            name=layer.name,
            caption=item.caption,
            options=options,
            pixels=pixels,
            box=box,
            sources=sources,
            noise=0.0 if options.lock else float(noise),
            noise_source=item.noise_source,
            layer_id=_layer_id(layer),
        )

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled()

    def _sources(self, layer: Layer) -> list[str]:
        """The PSD layers whose pixels this collage layer holds."""
        if layer.is_group():
            parts = [
                d.name
                for d in layer.descendants()
                if not d.is_group()
                and self.compositor.accept(d)
                and not self._excluded_above(d, layer)
            ]
        else:
            parts = [layer.name]
        clips = [c.name for c in layer.clip_layers if self.compositor.accept(c)]
        return parts + clips

    def _excluded_above(self, layer: Layer, top: Layer) -> bool:
        parent = layer.parent
        while parent is not None and parent is not top:
            if id(parent) in self.excluded:
                return True
            parent = parent.parent
        return False

    def _flatten(self) -> np.ndarray:
        """The flattened collage, (H, W, 3) uint8 sRGB over white."""
        with psd_tools_errors(self.path, "compositing the document"):
            return self.compositor.flatten()

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
        with psd_tools_errors(self.path, f"reading variant {chosen.name!r}"):
            pixels = self.compositor.render(chosen, (0, 0, *self.size), opaque=True)
        return BaseImage(
            layer=chosen.name,
            group=group.name,
            pixels=pixels,
            record_index=record_index(self.psd, chosen),
        )

    # -- prompts --------------------------------------------------------------

    def _text_of(self, kind: str) -> str | None:
        found = self.prompt_layers[kind]
        if not found:
            return None
        if len(found) > 1:
            self.warnings.append(
                f"{len(found)} text layers are named {kind!r}: using the top-most one"
            )
        with psd_tools_errors(self.path, f"reading the {kind!r} text layer"):
            return clean_text(found[-1].text)

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


def _layer_id(layer: Layer) -> int | None:
    try:
        value = layer.layer_id
    except (AttributeError, KeyError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def _ancestors(layer: Layer) -> list[Layer]:
    out = []
    while isinstance(layer.parent, Layer):
        layer = layer.parent
        out.append(layer)
    return out


def _photoshop_locked(layer: Layer) -> bool:
    """Photoshop's "Lock all" (layer or an enclosing group): the 'lspf' top bit."""
    node: Any = layer
    while node is not None and isinstance(node, Layer):
        locks = node.locks
        if locks is not None and int(locks.value) & _LOCK_ALL:
            return True
        node = node.parent
    return False


def record_index(psd: PSDImage, target: Layer) -> int:
    """Where ``target``'s record is in the file's layer records: the identity the writer
    uses to find this very layer again (names can repeat).

    Records run bottom to top, and a group is its end marker, its children, then its own
    record (the order psd-tools reads and writes them in).
    """
    index = 0

    def walk(group: Any) -> bool:
        nonlocal index
        for layer in group:  # bottom to top
            if layer.is_group():
                index += 1  # the group's end marker
                if walk(layer):
                    return True
            if layer is target:
                return True
            index += 1
        return False

    if not walk(psd):
        raise ValueError(f"layer {target.name!r} is not in this document")
    return index


def _meaningful(options: LayerOptions) -> bool:
    """Options that would change a collage layer (skip is honoured anywhere)."""
    return bool(dataclasses.replace(options, skip=None).as_dict())

"""Settings and per-layer options: the one place that parses tags and sidecars.

Sources, lowest to highest priority: built-in defaults < PSD content (text
layers, tags in layer names) < folder defaults (``ROOT/collage.toml``) <
per-file sidecar (``NAME.psd.toml``) < command-line flags. The ``noise``,
``ti`` ... settings are *defaults* for layers whose name carries no such tag; a
tag in a layer name is more specific and wins over them, and the sidecar's
``[layers."name"]`` table wins over the tag.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SettingsError, TagError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# ---------------------------------------------------------------------------
# Per-layer options (tags in layer names, [layers."name"] tables in sidecars)
# ---------------------------------------------------------------------------

#: Tag key -> (kind, help). Kinds: "unit" float in [0, 1], "weight" float in [0, 2], "flag" bool.
LAYER_KEYS: dict[str, tuple[str, str]] = {
    "noise": ("unit", "how much this region may change (0 keeps it, 1 repaints it)"),
    "lock": ("flag", "keep this layer's pixels exactly (same as noise=0)"),
    "skip": ("flag", "leave this layer out of the collage"),
    "split": ("flag", "a group: make each child its own collage layer"),
    "redo": ("flag", "regenerate this layer on top of the chosen earlier result"),
    "ti": ("flag", "learn this layer's look with textual inversion"),
    "inside": ("weight", "how strongly the caption is pulled into the layer's area"),
    "outside": ("weight", "how strongly the caption is pushed out of the rest of the image"),
}

_TRUE = {"", "on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}
_TAG_BLOCK = re.compile(r"\s*\[([^\[\]]*)\]\s*$")


@dataclass(frozen=True)
class LayerOptions:
    """Per-layer options; ``None`` means "not set here, use the default"."""

    noise: float | None = None
    lock: bool | None = None
    skip: bool | None = None
    split: bool | None = None
    redo: bool | None = None
    ti: bool | None = None
    inside: float | None = None
    outside: float | None = None

    def merged(self, other: LayerOptions) -> LayerOptions:
        """``other``'s set values win over ours."""
        changes = {f.name: getattr(other, f.name) for f in fields(other)}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


def split_layer_name(name: str) -> tuple[str, str | None]:
    """``'a red car [noise=0.4, ti]'`` -> ``('a red car', 'noise=0.4, ti')``."""
    match = _TAG_BLOCK.search(name)
    if not match:
        return name.strip(), None
    return name[: match.start()].strip(), match.group(1)


def parse_tags(block: str, *, layer: str) -> LayerOptions:
    """Parse a tag block (without brackets). Unknown keys and bad values are errors."""
    values: dict[str, Any] = {}
    for raw in block.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key not in LAYER_KEYS:
            known = ", ".join(LAYER_KEYS)
            raise TagError(f"layer {layer!r}: unknown tag {key!r} (known tags: {known})")
        values[key] = _coerce(key, value if sep else "", layer=layer, where="tag")
    return LayerOptions(**values)


def layer_options_from_mapping(data: Mapping[str, Any], *, layer: str, where: str) -> LayerOptions:
    """Validate a sidecar ``[layers."name"]`` table."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in LAYER_KEYS:
            known = ", ".join(LAYER_KEYS)
            raise SettingsError(
                f"{where}: layer {layer!r}: unknown key {key!r} (known keys: {known})"
            )
        values[key] = _coerce(key, value, layer=layer, where=where)
    return LayerOptions(**values)


def _coerce(key: str, value: Any, *, layer: str, where: str) -> Any:
    kind = LAYER_KEYS[key][0]
    error = TagError if where == "tag" else SettingsError
    prefix = f"layer {layer!r}" if where == "tag" else f"{where}: layer {layer!r}"
    if kind == "flag":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise error(f"{prefix}: tag {key}={value!r} is not on/off")
    low, high = (0.0, 1.0) if kind == "unit" else (0.0, 2.0)
    if isinstance(value, bool) or value == "":
        raise error(
            f"{prefix}: tag {key!r} needs a number between {low:g} and {high:g}, e.g. {key}=0.5"
        )
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(
            f"{prefix}: tag {key}={value!r} is not a number between {low:g} and {high:g}"
        ) from None
    if not low <= number <= high:
        raise error(
            f"{prefix}: tag {key}={value!r} is out of range: use a number between {low:g} and {high:g}"
        )
    return number


# ---------------------------------------------------------------------------
# Document / render settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a render needs besides the PSD. Field names are the CLI's long options."""

    model: str = DEFAULT_MODEL
    prompt: str | None = None
    negative: str | None = None
    prompt_suffix: str = ""
    variants: int = 4
    seed: int | None = None
    steps: int = 50
    guidance: float = 7.0
    scheduler: str = "euler_ancestral"
    resolution: int | None = None
    noise: float = 0.6
    ti: bool = False
    ti_steps: int = 250
    ti_lr: float = 4e-4
    ti_batch: int = 4
    export_ti: bool = False
    device: str | None = None
    dtype: str | None = None
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    allow_pickle: bool = False
    max_pixels: int = 120_000_000
    min_area: float = 0.01
    preview: bool = False
    layers: Mapping[str, LayerOptions] = field(default_factory=dict)

    def updated(self, values: Mapping[str, Any], *, where: str = "settings") -> Settings:
        """A copy with ``values`` (already validated, or validated here) applied on top."""
        clean = validate_settings(values, where=where)
        layers = dict(self.layers)
        for name, opts in clean.pop("layers", {}).items():
            layers[name] = layers.get(name, LayerOptions()).merged(opts)
        return dataclasses.replace(self, **clean, layers=layers)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}
        out["layers"] = {name: opts.as_dict() for name, opts in self.layers.items()}
        return out


_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "prompt": (str,),
    "negative": (str,),
    "prompt_suffix": (str,),
    "variants": (int,),
    "seed": (int,),
    "steps": (int,),
    "guidance": (int, float),
    "scheduler": (str,),
    "resolution": (int,),
    "noise": (int, float),
    "ti": (bool,),
    "ti_steps": (int,),
    "ti_lr": (int, float),
    "ti_batch": (int,),
    "export_ti": (bool,),
    "device": (str,),
    "dtype": (str,),
    "attention_slicing": (bool,),
    "vae_tiling": (bool,),
    "cpu_offload": (bool,),
    "allow_pickle": (bool,),
    "max_pixels": (int,),
    "min_area": (int, float),
    "preview": (bool,),
}
SETTING_KEYS = frozenset(_SETTING_TYPES) | {"layers"}

_RANGES: dict[str, tuple[float, float]] = {
    "variants": (1, 64),
    "steps": (1, 1000),
    "guidance": (0, 50),
    "noise": (0, 1),
    "resolution": (64, 4096),
    "ti_steps": (1, 100_000),
    "ti_batch": (1, 64),
    "max_pixels": (1, 10**10),
    "min_area": (0, 1),
    "seed": (0, 2**63 - 1),
}


def validate_settings(values: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Check keys, types and ranges; returns a dict ready for ``dataclasses.replace``."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in SETTING_KEYS:
            hint = _did_you_mean(key, SETTING_KEYS)
            raise SettingsError(f"{where}: unknown setting {key!r}{hint}")
        if value is None:
            continue
        if key == "layers":
            if not isinstance(value, Mapping):
                raise SettingsError(f'{where}: "layers" must be tables like [layers."red car"]')
            layers = {}
            for name, table in value.items():
                if isinstance(table, LayerOptions):
                    layers[name] = table
                    continue
                if not isinstance(table, Mapping):
                    raise SettingsError(f'{where}: [layers."{name}"] must be a table of tags')
                layers[name] = layer_options_from_mapping(table, layer=name, where=where)
            clean["layers"] = layers
            continue
        types = _SETTING_TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(t.__name__ for t in types)
            raise SettingsError(f"{where}: setting {key!r} must be a {wanted}, not {value!r}")
        if key in _RANGES:
            low, high = _RANGES[key]
            if not low <= value <= high:
                raise SettingsError(
                    f"{where}: setting {key}={value!r} is out of range ({low:g}..{high:g})"
                )
        if key == "scheduler" and value not in SCHEDULERS:
            raise SettingsError(
                f"{where}: unknown scheduler {value!r} (known: {', '.join(SCHEDULERS)})"
            )
        if key == "resolution" and value % 64:
            raise SettingsError(f"{where}: resolution {value} must be a multiple of 64")
        clean[key] = float(value) if float in types and not isinstance(value, bool) else value
    return clean


#: Scheduler names accepted by ``--scheduler`` (mapped to diffusers classes by the engine).
SCHEDULERS = ("euler_ancestral", "euler", "ddim", "dpm++", "pndm", "lms")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and validate a TOML sidecar (``NAME.psd.toml`` or ``collage.toml``)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise SettingsError("sidecar is not UTF-8 text; save it as UTF-8", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(
            f"sidecar is not valid TOML ({exc}); fix the line it names", path=path
        ) from None
    except OSError as exc:
        raise SettingsError(f"cannot read sidecar: {exc.strerror}", path=path) from None
    return validate_settings(data, where=str(path))


def sidecar_path(psd_path: str | Path) -> Path:
    """``poster.psd`` -> ``poster.psd.toml``."""
    psd_path = Path(psd_path)
    return psd_path.with_name(psd_path.name + ".toml")


def _did_you_mean(key: str, options: frozenset[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(options))})"

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
import difflib
import math
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SettingsError, TagError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# ---------------------------------------------------------------------------
# Per-layer options (tags in layer names, [layers."name"] tables in sidecars)
# ---------------------------------------------------------------------------

#: Tag kinds: "unit" a number in [0, 1], "weight" a number in [0, 2], "flag" on/off.
_KIND_RANGES: dict[str, tuple[float, float]] = {"unit": (0.0, 1.0), "weight": (0.0, 2.0)}


def _tag(kind: str, help: str) -> Any:
    """One per-layer key: its kind and what it does (the field's name is the tag)."""
    return field(default=None, metadata={"kind": kind, "help": help})


_TRUE = {"", "on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}
_TAG_BLOCK = re.compile(r"\s*\[([^\[\]]*)\]\s*$")


@dataclass(frozen=True)
class LayerOptions:
    """Per-layer options; ``None`` means "not set here, use the default".

    The one table of per-layer keys: a tag in a layer name (``[noise=0.4, ti]``) and a
    sidecar's ``[layers."name"]`` table accept exactly these fields. Adding a key is one
    line here.
    """

    noise: float | None = _tag(
        "unit", "how much this region may change (0 keeps it, 1 repaints it)"
    )
    lock: bool | None = _tag("flag", "keep this layer's pixels exactly (same as noise=0)")
    skip: bool | None = _tag("flag", "leave this layer out of the collage")
    split: bool | None = _tag("flag", "a group: make each child its own collage layer")
    redo: bool | None = _tag("flag", "regenerate this layer on top of the chosen earlier result")
    ti: bool | None = _tag("flag", "learn this layer's look with textual inversion")
    inside: float | None = _tag(
        "weight", "how strongly the caption is pulled into the layer's area"
    )
    outside: float | None = _tag(
        "weight", "how strongly the caption is pushed out of the rest of the image"
    )
    canny: float | None = _tag(
        "unit", "how strongly a canny ControlNet holds this layer's outlines (needs --controlnet)"
    )

    def merged(self, other: LayerOptions) -> LayerOptions:
        """``other``'s set values win over ours."""
        changes = {f.name: getattr(other, f.name) for f in fields(other)}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


#: Tag key -> (kind, help), derived from :class:`LayerOptions`.
LAYER_KEYS: dict[str, tuple[str, str]] = {
    f.name: (f.metadata["kind"], f.metadata["help"]) for f in fields(LayerOptions)
}


def split_layer_name(name: str) -> tuple[str, str | None]:
    """``'a red car [noise=0.4, ti]'`` -> ``('a red car', 'noise=0.4, ti')``."""
    match = _TAG_BLOCK.search(name)
    if not match:
        return name.strip(), None
    return name[: match.start()].strip(), match.group(1)


def bracket_problem(name: str) -> str | None:
    """Why brackets in a layer name are not read as its tags, or None when they are.

    Only one ``[...]`` block at the very end of a name holds tags; any other bracket
    stays in the caption, so ``a red circle [noise=0.5`` (unclosed) would silently
    become caption text with the default noise. The reader warns with this.
    """
    caption, block = split_layer_name(name)
    opened, closed = caption.rfind("["), caption.rfind("]")
    if opened < 0 and closed < 0:
        return None
    if opened > closed:
        head = caption[:opened].rstrip()
        example = f", as in {f'{head} [{caption[opened + 1 :].strip()}]'!r}" if head else ""
        return (
            f"{caption[opened:]!r} has no closing ']', so it is caption text, not tags: "
            f"end the tags with ']' at the end of the name{example}"
        )
    if opened < 0 or caption.count("]") > caption.count("["):
        return (
            "its name has a ']' without an opening '[', so the text around it is caption "
            "text, not tags: tags go in one [...] block at the end of the name"
        )
    piece = caption[opened : closed + 1]
    rest = f"{caption[:opened].rstrip()} {caption[closed + 1 :].strip()}".strip()
    inner = ", ".join(part for part in (piece[1:-1].strip(), block) if part)
    return (
        f"{piece!r} is not at the end of the name, so it is caption text, not tags: tags go "
        f"in one [...] block at the end, as in {f'{rest} [{inner}]'!r}"
    )


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
            close = difflib.get_close_matches(key, list(LAYER_KEYS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TagError(f"layer {layer!r}: unknown tag {key!r} ({hint}known tags: {known})")
        if key in values:
            raise TagError(
                f"layer {layer!r}: tag {key!r} is given twice; keep one in the layer name"
            )
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
    low, high = _KIND_RANGES[kind]
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
# Choices
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerSpec:
    """A ``--scheduler`` name: the diffusers class the engine builds and its config changes."""

    diffusers_class: str
    config: Mapping[str, Any] = field(default_factory=dict)


#: The ``--scheduler`` names, declared once: the setting's choices and the engine's
#: classes (engine/models.py) both come from here. Adding a sampler is one line.
SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler_ancestral": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "ddim": SchedulerSpec("DDIMScheduler"),
    "dpm++": SchedulerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": SchedulerSpec("LMSDiscreteScheduler"),
}

#: ``--dtype`` names (the engine also takes fp16/bf16/fp32 from Python callers).
DTYPES = ("float16", "bfloat16", "float32")

#: ``--resolution`` works in latent cells of 8 px that the UNet halves three times.
RESOLUTION_STEP = 64


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora PATH[:SCALE]`` (also a sidecar's ``lora = ["PATH:SCALE", ...]``)."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``style.safetensors:0.8`` -> (path, 0.8); a tail that is no number is path
        (``C:\\loras\\style.safetensors``). ValueError for a scale outside -4..4."""
        path, sep, tail = text.rpartition(":")
        if not sep or not path:
            return cls(text)
        try:
            scale = float(tail)
        except ValueError:
            return cls(text)
        if not -4.0 <= scale <= 4.0:
            raise ValueError(f"LoRA scale {scale:g} is outside -4..4")
        return cls(path, scale)

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


# ---------------------------------------------------------------------------
# Document / render settings: the registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingSpec:
    """Everything known about one setting besides its name, type and default.

    The name, type and default are the :class:`Settings` field's; the rest is here.
    """

    help: str
    range: tuple[float, float] | None = None  # inclusive
    choices: tuple[str, ...] | None = None
    multiple_of: int | None = None
    unit: str | None = None  # shown as the option's value name in --help, e.g. PIXELS
    multiple: bool = False  # a list of values (a repeated option, a TOML array)
    default_text: str | None = None  # what the default means (where it is None or empty)
    option: bool = True  # False: no command-line option (the command sets it, or sidecars do)
    sidecar: bool = True  # False: operator-only; a designer's NAME.psd.toml may not set it
    rule: Callable[[Any], Any] | None = None  # one value -> normalised, or ValueError(why)
    paths: bool = False  # file paths: in a sidecar, relative ones are relative to the sidecar


def setting(default: Any, help: str, **spec: Any) -> Any:
    """Declare one setting: a :class:`Settings` field carrying its :class:`SettingSpec`."""
    return field(default=default, metadata={"spec": SettingSpec(help=help, **spec)})


@dataclass(frozen=True)
class Settings:
    """Everything a render needs besides the PSD. Field names are the CLI's long options.

    THE REGISTRY: each setting is declared here once (name, type, default, help, range,
    choices, units, who may set it). Validation (:func:`validate_settings`), the sidecar
    check, the click options (``psd_collage.options``) and ``--help`` all derive from these
    fields, so adding a setting is this one edit.
    """

    model: str = setting(
        DEFAULT_MODEL,
        "Hub id, local diffusers folder, single .safetensors (SD 1.x/2.x, SDXL, Flux.1, "
        "SD3.x), 'tiny' / 'tiny-sdxl' / 'tiny-flux' / 'tiny-sd3' (random weights), or "
        "'shapes' (a small trained model of coloured shapes).",
    )
    prompt: str | None = setting(
        None,
        "Global prompt (overrides the 'prompt' text layer).",
        default_text="the 'prompt' text layer, else the captions",
    )
    negative: str | None = setting(
        None, "Negative prompt.", default_text="the 'negative' text layer"
    )
    prompt_suffix: str = setting(
        "", "Appended to the global prompt (e.g. 'photo, golden hour').", default_text="none"
    )
    variants: int = setting(4, "How many variants (seeds).", range=(1, 64))
    seed: int | None = setting(
        None,
        "First seed; variants use seed, seed+1, ...",
        range=(0, 2**63 - 1),
        default_text="random",
    )
    steps: int = setting(50, "Sampling steps (paper: 50).", range=(1, 1000))
    guidance: float = setting(
        7.0,
        "Classifier-free guidance (paper: 7; Flux.1-dev: its distilled guidance, ~3.5).",
        range=(0, 50),
    )
    scheduler: str = setting("euler_ancestral", "Sampler.", choices=tuple(SCHEDULERS))
    resolution: int | None = setting(
        None,
        "Working pixel budget: the picture is sampled at about PIXELS x PIXELS pixels in "
        "all, keeping the document's aspect (each side rounded to 64). A multiple of 64.",
        range=(64, 4096),
        multiple_of=RESOLUTION_STEP,
        unit="PIXELS",
        default_text="the model's native size: 512 for SD 1.5, 1024 for SDXL",
    )
    noise: float = setting(
        0.6, "Noise for layers without a noise tag (0 keeps, 1 repaints).", range=(0, 1)
    )
    canny: float = setting(
        0.0,
        "Canny strength for layers without a canny tag (0 frees shapes, 1 holds outlines; "
        "needs --controlnet).",
        range=(0, 1),
    )
    controlnet: str | None = setting(
        None,
        "Canny ControlNet for the model (SD 1.x or SDXL): hub id, diffusers folder, "
        "single .safetensors, or 'tiny'.",
        unit="MODEL",
        default_text="none",
    )
    lora: tuple[str, ...] = setting(
        (),
        "LoRA .safetensors (kohya or diffusers), fused at SCALE (default 1); repeat for more.",
        multiple=True,
        unit="PATH[:SCALE]",
        default_text="none",
        rule=lambda text: str(LoraSpec.parse(text)),
        paths=True,
    )
    ti: bool = setting(False, "Textual inversion for every captioned layer.")
    ti_steps: int = setting(250, "Textual inversion steps per layer.", range=(1, 100_000))
    ti_lr: float = setting(4e-4, "Textual inversion learning rate.")
    ti_batch: int = setting(4, "Textual inversion batch size.", range=(1, 64))
    export_ti: bool = setting(False, "Write the learned tokens to NAME.harmonized.embeddings/.")
    device: str | None = setting(
        None, "cuda, cuda:1, mps or cpu.", default_text="the best available", sidecar=False
    )
    dtype: str | None = setting(
        None,
        "Number format of the weights.",
        choices=DTYPES,
        default_text="float16 on CUDA, else float32",
        sidecar=False,
    )
    attention_slicing: bool = setting(False, "Less GPU memory, slower.")
    vae_tiling: bool = setting(False, "Decode large images in tiles.")
    cpu_offload: bool = setting(False, "Keep idle models in RAM (6-8 GB GPUs).", sidecar=False)
    allow_pickle: bool = setting(
        False, "Allow .ckpt/.bin checkpoints (runs code in them!).", sidecar=False
    )
    max_pixels: int = setting(
        120_000_000,
        "Refuse documents larger than this.",
        range=(1, 10**10),
        unit="PIXELS",
        sidecar=False,
    )
    min_area: float = setting(
        0.01,
        "Layers covering less of the canvas than this fraction are not steered.",
        range=(0, 1),
    )
    # Each command declares --preview itself (watch and serve default to on).
    preview: bool = setting(False, "Also write NAME.preview.png.", option=False)
    lenient: bool = setting(
        False, "Read a layer whose pixel data is damaged with that channel black, not refuse it."
    )
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

    def engine_options(self) -> EngineOptions:
        """The part of these settings that loading a model depends on."""
        return EngineOptions(**{f.name: getattr(self, f.name) for f in fields(EngineOptions)})


@dataclass(frozen=True)
class Setting:
    """One registry entry, as the validation and the CLI use it."""

    name: str
    type: type  # int, float, str or bool
    optional: bool  # None is a valid value (and usually the default)
    default: Any
    spec: SettingSpec

    @property
    def accepted(self) -> tuple[type, ...]:
        """Python types a sidecar value may have (an int is a fine float)."""
        return (int, float) if self.type is float else (self.type,)

    def check(self, value: Any, *, where: str) -> Any:
        """The value, checked and normalised; a :class:`SettingsError` naming ``where``."""
        key, spec = self.name, self.spec
        if spec.multiple:
            items = [value] if isinstance(value, self.type) else value
            if not isinstance(items, list | tuple):
                raise SettingsError(f"{where}: setting {key!r} must be a list, not {value!r}")
            single = dataclasses.replace(self, spec=dataclasses.replace(spec, multiple=False))
            return tuple(single.check(item, where=where) for item in items)
        if not isinstance(value, self.accepted) or (
            isinstance(value, bool) and self.type is not bool
        ):
            wanted = " or ".join(t.__name__ for t in self.accepted)
            raise SettingsError(f"{where}: setting {key!r} must be a {wanted}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{where}: setting {key}={value!r} must be a finite number")
        if spec.range is not None:
            low, high = spec.range
            if not low <= value <= high:
                raise SettingsError(
                    f"{where}: setting {key}={value!r} is out of range ({low:g}..{high:g})"
                )
        if spec.choices is not None and value not in spec.choices:
            raise SettingsError(
                f"{where}: unknown {key} {value!r} (known: {', '.join(spec.choices)})"
            )
        if spec.multiple_of and value % spec.multiple_of:
            raise SettingsError(f"{where}: {key} {value} must be a multiple of {spec.multiple_of}")
        if spec.rule is not None:
            try:
                value = spec.rule(value)
            except ValueError as error:
                raise SettingsError(f"{where}: setting {key}={value!r}: {error}") from None
        return float(value) if self.type is float else value


def _registry(cls: type) -> dict[str, Setting]:
    hints = typing.get_type_hints(cls)
    registry = {}
    for f in fields(cls):
        if "spec" not in f.metadata:
            continue  # "layers": the per-layer tables, checked by LayerOptions
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        if typing.get_origin(base) is tuple:  # tuple[str, ...]: a list of str
            base = typing.get_args(base)[0]
        registry[f.name] = Setting(f.name, base, bool(args), f.default, f.metadata["spec"])
    return registry


#: Setting name -> :class:`Setting`, in declaration order (derived from :class:`Settings`).
SETTINGS: dict[str, Setting] = _registry(Settings)


@dataclass(frozen=True)
class PolicyLimits:
    """The operator's limits: ``[policy]`` in ``ROOT/collage.toml`` or options of ``watch``
    and ``worker``; ``None`` is no limit. Enforced by :mod:`psd_collage.policy`.

    THE POLICY REGISTRY, like :class:`Settings`: each limit is declared here once and its
    option, its ``[policy]`` check and ``--help`` derive from it. None of them can come
    from a designer's sidecar. The document size limit is the ``max_pixels`` setting
    (operator-only); ``[policy]`` may set it too.
    """

    max_steps: int | None = setting(
        150, "Refuse files that ask for more sampling steps.", range=(1, 1000), sidecar=False
    )
    max_variants: int | None = setting(
        16, "Refuse files that ask for more variants.", range=(1, 64), sidecar=False
    )
    max_resolution: int | None = setting(
        2048,
        "Refuse files whose working resolution (--resolution, else the model's) is larger.",
        range=(64, 4096),
        unit="PIXELS",
        sidecar=False,
    )
    models: tuple[str, ...] | None = setting(
        None,
        "Only these models, ControlNets and LoRA files (repeat the option; a list in [policy]).",
        multiple=True,
        unit="MODEL",
        default_text="any",
        sidecar=False,
    )
    job_timeout: float | None = setting(
        600.0,
        "End a render that runs longer, as failed.",
        range=(1, 7 * 24 * 3600),
        unit="SECONDS",
        sidecar=False,
    )


#: Limit name -> :class:`Setting` (derived from :class:`PolicyLimits`).
POLICY_SETTINGS: dict[str, Setting] = _registry(PolicyLimits)
SETTING_KEYS = frozenset(SETTINGS) | {"layers"}


@dataclass(frozen=True)
class EngineOptions:
    """What loading a model depends on: one declaration for the render's warm-engine key,
    :func:`psd_collage.engine.load_engine` and ``Engine``. Defaults are the settings'."""

    model: str = SETTINGS["model"].default
    device: str | None = SETTINGS["device"].default
    dtype: str | None = SETTINGS["dtype"].default
    scheduler: str = SETTINGS["scheduler"].default
    allow_pickle: bool = SETTINGS["allow_pickle"].default
    attention_slicing: bool = SETTINGS["attention_slicing"].default
    vae_tiling: bool = SETTINGS["vae_tiling"].default
    cpu_offload: bool = SETTINGS["cpu_offload"].default


def validate_settings(
    values: Mapping[str, Any], *, where: str, designer: bool = False
) -> dict[str, Any]:
    """Check keys, types and ranges; returns a dict ready for ``dataclasses.replace``.

    ``designer``: the values come from a designer's sidecar, which may not set the
    operator-only settings (``SettingSpec.sidecar`` False).
    """
    clean: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in SETTING_KEYS:
            hint = _did_you_mean(key, SETTING_KEYS)
            raise SettingsError(f"{where}: unknown setting {key!r}{hint}")
        if designer and key in SETTINGS and not SETTINGS[key].spec.sidecar:
            raise SettingsError(
                f"{where}: setting {key!r} is operator-only: set it on the command line or in "
                "the folder defaults, not in a file's sidecar"
            )
        if value is None:
            continue
        if key == "layers":
            clean["layers"] = _layer_tables(value, where=where)
            continue
        clean[key] = SETTINGS[key].check(value, where=where)
    return clean


def _layer_tables(value: Any, *, where: str) -> dict[str, LayerOptions]:
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
    return layers


def read_sidecar(path: str | Path, *, designer: bool = True) -> dict[str, Any]:
    """Read and validate a TOML sidecar: a designer's ``NAME.psd.toml``, or with
    ``designer=False`` the operator's folder defaults (``collage.toml``)."""
    path = Path(path)
    values = validate_settings(read_toml(path), where=str(path), designer=designer)
    return relative_paths(values, path.parent)


def relative_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """File paths a TOML file gives (``lora = ["style.safetensors"]``) are relative to its
    folder, not to wherever the hot folder or the worker was started."""
    for key, entry in SETTINGS.items():
        if not entry.spec.paths or key not in values:
            continue
        items = values[key] if entry.spec.multiple else (values[key],)
        resolved = tuple(
            item if item.startswith("~") or Path(item).is_absolute() else str(folder / item)
            for item in items
        )
        values[key] = resolved if entry.spec.multiple else resolved[0]
    return values


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's tables, unchecked; ``{}`` when it does not exist. Bad TOML: one error."""
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
    return data


def sidecar_path(psd_path: str | Path) -> Path:
    """``poster.psd`` -> ``poster.psd.toml``."""
    psd_path = Path(psd_path)
    return psd_path.with_name(psd_path.name + ".toml")


def has_sidecar(sidecar: Path) -> bool:
    """Whether the sidecar file exists; a document whose name is so long that no sidecar
    name can exist (ENAMETOOLONG) has none, rather than an error."""
    try:
        return sidecar.is_file()
    except OSError:
        return False


def _did_you_mean(key: str, options: frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(options))})"

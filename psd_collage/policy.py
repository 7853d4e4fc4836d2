"""The operator's policy: limits a designer's sidecar cannot raise.

Whoever runs the hot folder (or the render farm) sets them in the ``[policy]``
table of ``ROOT/collage.toml`` or as options of ``watch``/``worker``; when both
give a limit the tighter one wins. The limits are declared once, in
:class:`psd_collage.settings.PolicyLimits`; the document size limit is the
operator-only ``max_pixels`` setting. A designer's sidecar can set none of them,
nor any other operator-only setting such as ``allow_pickle`` (the settings
registry refuses those in sidecars). A file over a limit fails with one line
that names the limit.

The policy is enforced by :class:`psd_collage.render.Renderer` (``policy=``),
so the single-process watcher and every farm worker apply the same rules.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CollageError, SettingsError
from .settings import (
    POLICY_SETTINGS,
    SETTINGS,
    LoraSpec,
    PolicyLimits,
    read_toml,
    relative_paths,
    validate_settings,
)


class PolicyError(CollageError):
    """A file (or its sidecar) asks for more than the operator's policy allows."""


#: Where the operator's limits are written, for the messages.
WHERE = "set by whoever runs the hot folder, in collage.toml [policy] or its options"


@dataclass(frozen=True)
class Policy(PolicyLimits):
    """The limits in force, with the checks the renderer runs before any work."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str) -> Policy:
        """A ``[policy]`` table (without ``max_pixels``) on top of the defaults."""
        return cls().tightened(values, where=where, replace=True)

    def tightened(self, values: Mapping[str, Any], *, where: str, replace: bool = False) -> Policy:
        """A copy with ``values`` applied: the tighter limit wins unless ``replace``."""
        changes: dict[str, Any] = {}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in POLICY_SETTINGS:
                known = ", ".join([*POLICY_SETTINGS, "max_pixels"])
                raise SettingsError(f"{where}: unknown policy key {key!r} (known: {known})")
            if value is None or value == ():
                continue
            value = POLICY_SETTINGS[key].check(value, where=where)
            current = getattr(self, key)
            if replace or current is None:
                changes[key] = value
            elif key == "models":
                changes[key] = tuple(m for m in current if m in value)
            else:
                changes[key] = min(current, value)
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["models"] = list(self.models) if self.models is not None else None
        return out

    def check_settings(self, settings: Any, *, path: str | Path | None = None) -> None:
        """Steps, variants, resolution and model against the limits (before any work)."""
        for key, limit in (
            ("steps", self.max_steps),
            ("variants", self.max_variants),
            ("resolution", self.max_resolution),
        ):
            value = getattr(settings, key)
            if limit is not None and value is not None and value > limit:
                raise _over(path, f"{key}={value}", f"max_{key}={limit}", "lower it in the sidecar")
        if self.models is None:
            return
        allowed = {os.path.realpath(name) for name in self.models}
        for kind, name in _weights(settings):
            if name not in self.models and os.path.realpath(name) not in allowed:
                raise PolicyError(
                    f"{kind} {name!r} is not on the models allow-list "
                    f"({', '.join(self.models) or 'empty'}; {WHERE}): use one of those",
                    path=path,
                )

    def check_canvas(
        self, size: tuple[int, int], max_pixels: int, *, path: str | Path | None = None
    ) -> None:
        """The document's size against ``max_pixels`` (an operator-only setting)."""
        width, height = size
        if width * height > max_pixels:
            what = f"canvas {width} x {height} px ({width * height / 1e6:.3g} megapixels)"
            raise _over(path, what, f"max_pixels={max_pixels}", "reduce it with Image > Image Size")

    def check_working_resolution(self, resolution: int, *, path: str | Path | None = None) -> None:
        """The model's own working resolution, when the file does not set one."""
        if self.max_resolution is not None and resolution > self.max_resolution:
            what = f"the model's working resolution {resolution}"
            raise _over(
                path, what, f"max_resolution={self.max_resolution}", "set a smaller resolution"
            )

    def deadline(self) -> Deadline:
        return Deadline(self.job_timeout, time.monotonic())


@dataclass(frozen=True)
class Deadline:
    """The job timeout as a cancel callback: the render stops at its next step."""

    seconds: float | None
    started: float

    def passed(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.started >= self.seconds

    def cancel_callback(self, other: Callable[[], bool] | None = None) -> Callable[[], bool]:
        return lambda: self.passed() or bool(other and other())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def error(self, path: str | Path | None = None) -> PolicyError:
        """Says how long the job really ran: a step or a layer in progress finishes first."""
        return PolicyError(
            f"the job was stopped after {self.elapsed():.1f} s, over the limit job_timeout="
            f"{self.seconds:g} ({WHERE}); use fewer steps or variants, a smaller resolution "
            "or a smaller document",
            path=path,
        )


def read_folder_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ROOT/collage.toml``: (folder defaults, its ``[policy]`` table), both validated.

    ``max_pixels`` in ``[policy]`` is the operator-only setting: it joins the defaults
    (the smaller value wins when both places give one).
    """
    data = dict(read_toml(path))
    table = dict(data.pop("policy", {}) or {})
    where = f"{path} [policy]"
    if not isinstance(table, Mapping):
        raise SettingsError(f"{path}: policy must be a table: [policy]")
    defaults = relative_paths(validate_settings(data, where=str(path)), Path(path).parent)
    if "max_pixels" in table:
        limit = SETTINGS["max_pixels"].check(table.pop("max_pixels"), where=where)
        defaults["max_pixels"] = min(limit, defaults.get("max_pixels", limit))
    Policy.from_mapping(table, where=where)
    return defaults, table


def folder_policy(config_file: str | Path, options: Mapping[str, Any] | None = None) -> Policy:
    """The ``[policy]`` of ``ROOT/collage.toml``, tightened by the service's options."""
    _, table = read_folder_config(config_file)
    policy = Policy.from_mapping(table, where=f"{config_file} [policy]")
    limits = {k: v for k, v in (options or {}).items() if k != "max_pixels"}
    return policy.tightened(limits, where="command line")


def _weights(settings: Any) -> list[tuple[str, str]]:
    """Every weight file a render loads, for the allow-list: a sidecar's LoRA path or
    ControlNet would otherwise load whatever the worker's disk holds."""
    found = [("model", settings.model)]
    if settings.controlnet:
        found.append(("ControlNet", settings.controlnet))
    found += [("LoRA", LoraSpec.parse(text).path) for text in settings.lora]
    return found


def _over(path: str | Path | None, what: str, limit: str, hint: str) -> PolicyError:
    return PolicyError(f"{what} is over the limit {limit} ({WHERE}); {hint}", path=path)

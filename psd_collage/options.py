"""The command-line pieces every command shares: the render options and the error guard.

The one home for them: ``psd-collage render`` (``psd_collage/cli.py``) and
``psd-collage watch`` (``watcher/cli.py``) both import from here, and a new command
(``worker``, ``serve``, ``status``...) does the same, then is registered with one explicit
``main.add_command(...)`` line in ``psd_collage/cli.py``. Nothing here imports a command,
so there is no import cycle.

The render options are derived from the settings registry (:data:`psd_collage.settings.SETTINGS`):
add a setting there, not here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import click
from click.core import ParameterSource

from .errors import CollageError
from .settings import POLICY_SETTINGS, SETTING_KEYS, SETTINGS, Setting


def guarded(func: Callable) -> Callable:
    """Turn user errors into one ``error:`` line + their exit status, bugs into one line + 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CollageError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug, not the user's fault
            if os.environ.get("PSD_COLLAGE_DEBUG"):
                raise
            name = type(exc).__name__
            click.echo(
                f"error: internal error ({name}: {exc}); please report it, "
                "with PSD_COLLAGE_DEBUG=1 set for the traceback",
                err=True,
            )
            sys.exit(1)

    return wrapper


def render_options(func: Callable) -> Callable:
    """Every setting with ``option=True`` in the registry, as a click option."""
    for entry in reversed(SETTINGS.values()):
        if entry.spec.option:
            func = setting_option(entry)(func)
    return func


def policy_options(func: Callable) -> Callable:
    """The operator's limits (:data:`psd_collage.settings.POLICY_SETTINGS`) as options.

    They tighten ``[policy]`` in ``ROOT/collage.toml``; ``--max-pixels`` (a render
    option) is a limit too. Shown without defaults: unset, the folder's policy holds.
    """
    for entry in reversed(POLICY_SETTINGS.values()):
        shown = entry.spec.default_text or f"{entry.default:g} or [policy]"
        spec = dataclasses.replace(entry.spec, default_text=shown)
        func = setting_option(dataclasses.replace(entry, default=None, spec=spec))(func)
    return func


def policy_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The limits the operator gave on the command line (``max_pixels`` included)."""
    return _given(options, {*POLICY_SETTINGS, "max_pixels"})


def setting_option(entry: Setting) -> Callable:
    """The click option of one setting: its type, range or choices, units, default and rules."""
    spec = entry.spec
    flag = "--" + entry.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": spec.help, "metavar": spec.unit}
    if entry.default is None:
        kwargs["show_default"] = spec.default_text or False
    else:
        kwargs.update(default=entry.default, show_default=spec.default_text or True)
    if entry.type is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", entry.name, **kwargs)
    if spec.multiple:
        kwargs.update(multiple=True, type=entry.type, show_default=spec.default_text or False)
        kwargs.pop("default", None)
        if spec.rule:
            kwargs["callback"] = _checked_by(entry)
        return click.option(flag, entry.name, **kwargs)
    if spec.choices is not None:
        kwargs["type"] = click.Choice(spec.choices)
    elif spec.range is not None and entry.type in (int, float):
        low, high = spec.range
        kind = click.IntRange if entry.type is int else click.FloatRange
        kwargs["type"] = kind(entry.type(low), entry.type(high))
    else:
        kwargs["type"] = entry.type
    if spec.multiple_of or spec.rule:
        kwargs["callback"] = _checked_by(entry)
    return click.option(flag, entry.name, **kwargs)


def _checked_by(entry: Setting) -> Callable:
    """A click callback applying the registry's rules that click types cannot say."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT:
            return value
        try:
            return entry.check(value, where=param.get_error_hint(ctx))
        except CollageError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None

    return callback


def settings_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the user actually gave on the command line (not click's defaults)."""
    return _given(options, SETTING_KEYS)


def _given(options: Mapping[str, Any], keys: set[str] | frozenset[str]) -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    given = {}
    for key, value in options.items():
        if key not in keys or value is None or value == ():
            continue
        if ctx is not None and ctx.get_parameter_source(key) is ParameterSource.DEFAULT:
            continue
        given[key] = value
    return given

"""The models psd-collage knows by name, without torch: what ``--model NAME`` can mean
besides a path or a Hugging Face id, and the closest of them to a mistyped name."""

from __future__ import annotations

import difflib
from pathlib import Path

#: Small random-weight models built offline (tests, every code path; pictures are noise).
TINY_MODELS = {"tiny": "sd1", "tiny-sdxl": "sdxl"}
#: The same for the flow-matching transformer families (:mod:`.flow_models`).
TINY_FLOW_MODELS = {"tiny-flux": "flux", "tiny-sd3": "sd3"}
#: Diffusers pipeline class-name prefixes of the flow families (model_index.json).
FLOW_PIPELINES = {"Flux": "flux", "StableDiffusion3": "sd3"}
#: Trained models shipped inside the package (diffusers folders), by ``--model`` name.
PACKAGED_MODELS = {"shapes": Path(__file__).resolve().parent.parent / "shapes" / "weights"}


def flow_family_of(index: dict) -> str | None:
    """``flux`` / ``sd3`` when a diffusers ``model_index.json`` is such a pipeline, else None."""
    name = str(index.get("_class_name", ""))
    return next((fam for prefix, fam in FLOW_PIPELINES.items() if name.startswith(prefix)), None)


def known_names() -> list[str]:
    """Every model name that needs no path, hub id or download."""
    return [*PACKAGED_MODELS, *TINY_MODELS, *TINY_FLOW_MODELS]


def closest_name(name: str) -> str | None:
    """The known model name ``name`` is most likely a typo of (``shape`` -> ``shapes``)."""
    lowered = name.strip().lower()
    for known in known_names():
        if lowered == known:
            return known
    close = difflib.get_close_matches(lowered, known_names(), n=1, cutoff=0.6)
    return close[0] if close else None


def in_hub_cache(repo_id: str) -> str | None:
    """The cached ``model_index.json`` of Hugging Face model ``repo_id``, or None: whether the
    model has been downloaded here (nothing is fetched)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except ValueError:  # not a valid repo id
        return None
    return found if isinstance(found, str) else None


def typo_of_known_name(name: str) -> str | None:
    """The one-line error for a ``--model`` that is most likely a typo of a known name
    (``shape``: did you mean ``shapes``?), or None when it is not one."""
    close = closest_name(name)
    if close is None or close == name or "/" in name or in_hub_cache(name):
        return None
    return (
        f"model {name!r} is not a file or folder here, nor a Hugging Face model in the local "
        f"cache: did you mean --model {close}? (models known by name: {', '.join(known_names())})"
    )

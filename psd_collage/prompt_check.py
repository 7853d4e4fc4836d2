"""What a render will do with the prompt and the captions, known before it samples.

The one place that predicts it: ``inspect`` shows it and ``render`` warns with it before
any sampling, with the same words. Only the model's tokenizers are needed
(:mod:`psd_collage.engine.captions`, no torch, no weights): the prompt as sampling sees
it (captions it lacks appended), its length against the text encoder's window (77
tokens for Stable Diffusion, 32 for ``shapes``), and the captions that will not be
steered because they fall past that window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .collage import Collage
from .errors import ModelError

if TYPE_CHECKING:  # no torch, no tokenizers at import: inspect stays light
    from .engine.captions import PromptReader


@dataclass(frozen=True)
class PromptCheck:
    """The prompt and captions as the model's tokenizers see them."""

    sampled: str  # the prompt sampling uses, captions it lacked appended
    tokens: int | None = None  # the sampled prompt's tokens; None: not checked
    limit: int | None = None  # tokens the text encoder reads
    unsteered: frozenset[str] = frozenset()  # captions steering will skip
    warnings: list[str] = field(default_factory=list)
    unchecked: str | None = None  # why the tokens were not checked

    def steered(self, caption: str) -> bool:
        """Whether a steered layer with this caption keeps its steering at sampling."""
        return caption not in self.unsteered

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.tokens,
            "limit": self.limit,
            "not_steered": sorted(self.unsteered),
            "unchecked": self.unchecked,
        }


def check_prompt(collage: Collage, reader: PromptReader) -> PromptCheck:
    """What sampling will do with ``collage``'s prompt and captions, read as ``reader``
    reads them (the engine's :meth:`~psd_collage.engine.api.Engine.prompt_reader`, or one
    from the model's tokenizers alone)."""
    captions = [layer.caption for layer in collage.layers if layer.steered]
    sampled, places, warnings = reader.locate(collage.final_prompt, captions)
    missed = {c for c, place in zip(captions, places, strict=True) if place is None}
    return PromptCheck(
        sampled=sampled,
        tokens=reader.count(sampled),
        limit=reader.limit,
        unsteered=frozenset(missed),
        warnings=warnings,
    )


def check_prompt_for_model(collage: Collage, model: str) -> PromptCheck:
    """:func:`check_prompt` with ``model``'s tokenizers, read without its weights; where
    they are not to be had here, a check that says why it could not look."""
    from .engine.captions import clip_reader, load_tokenizers

    try:
        tokenizers = load_tokenizers(model)
    except ModelError as exc:
        return PromptCheck(sampled=collage.final_prompt, unchecked=str(exc))
    return check_prompt(collage, clip_reader(tokenizers))

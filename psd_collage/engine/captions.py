"""Where each layer caption sits in the prompt's tokens; the tokenizers alone, no weights.

A caption is steered through the prompt tokens that spell it, so we locate it as a
subsequence of the prompt's token ids (CLIP's BPE encodes each word on its own, so
a caption tokenizes the same alone and in context). Captions missing from the
prompt are appended to it. A caption that still has no tokens inside the text
encoder's window (77 tokens for Stable Diffusion, 32 for ``shapes``) is reported and
not steered, never matched to the wrong tokens; words past the window are reported too.

This module imports no torch and reads no weights: ``inspect`` predicts with it
(:func:`load_tokenizers`) what the engine will do, and the engine steers with it.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from ..errors import ModelError
from .catalog import (
    PACKAGED_MODELS,
    TINY_FLOW_MODELS,
    TINY_MODELS,
    flow_family_of,
    in_hub_cache,
    typo_of_known_name,
)
from .tiny_vocab import build_tiny_tokenizer


@dataclass(frozen=True)
class Span:
    """Token positions ``start .. start+length-1`` in the encoded sequence (BOS is position 0)."""

    start: int
    length: int

    def positions(self) -> range:
        return range(self.start, self.start + self.length)


def _ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    return list(
        tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    )


def _occurrences(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    n = len(needle)
    if n == 0:
        return []
    first = needle[0]
    return [
        i
        for i in range(len(haystack) - n + 1)
        if haystack[i] == first and list(haystack[i : i + n]) == list(needle)
    ]


def _assign(prompt_ids: list[int], captions: list[list[int]]) -> list[int | None]:
    """Start index (in prompt_ids) per caption: longest captions first, no shared tokens."""
    taken: set[int] = set()
    starts: list[int | None] = [None] * len(captions)
    order = sorted(
        (i for i, ids in enumerate(captions) if ids), key=lambda i: (-len(captions[i]), i)
    )
    for i in order:
        for start in _occurrences(prompt_ids, captions[i]):
            cells = set(range(start, start + len(captions[i])))
            if not cells & taken:
                taken |= cells
                starts[i] = start
                break
    return starts


def caption_starts(
    prompt_ids: Sequence[int], captions: Sequence[Sequence[int]]
) -> list[int | None]:
    """Where each caption's token ids start in ``prompt_ids`` (longest captions first, no
    shared tokens; None: not found). The transformer families locate captions in their T5
    tokens with it."""
    return _assign(list(prompt_ids), [list(ids) for ids in captions])


def _append(prompt: str, caption: str) -> str:
    head = prompt.rstrip()
    if not head:
        return caption
    return f"{head} {caption}" if head.endswith(",") else f"{head}, {caption}"


def locate_captions(
    tokenizers: Sequence[CLIPTokenizer], prompt: str, captions: Sequence[str | None]
) -> tuple[str, list[Span | None], list[str]]:
    """(prompt with missing captions appended, span per caption or None, warnings).

    ``None`` captions (layers without a caption) get ``None`` quietly. With two
    tokenizers (SDXL) a caption must sit at the same positions in both.
    """
    main = tokenizers[0]
    caption_ids = [_ids(main, c) if c and c.strip() else [] for c in captions]
    starts = _assign(_ids(main, prompt), caption_ids)
    used = prompt
    for caption, ids, start in zip(captions, caption_ids, starts, strict=True):
        if ids and start is None:
            used = _append(used, caption.strip())  # type: ignore[union-attr]
    prompt_ids = _ids(main, used)
    starts = _assign(prompt_ids, caption_ids)
    limit = token_limit(main)
    spans: list[Span | None] = []
    warnings: list[str] = []
    if len(prompt_ids) > limit:
        warnings.append(
            f"the prompt is {len(prompt_ids)} tokens long and the model reads only {limit}: "
            f"{_past_limit(main, used, limit)!r} at its end is ignored; shorten the prompt"
        )
    for caption, ids, start in zip(captions, caption_ids, starts, strict=True):
        if not ids:
            spans.append(None)
            continue
        if start is None or start + len(ids) > limit:
            warnings.append(
                f"caption {caption!r} is past the {limit} tokens of the prompt the model reads "
                "and is not steered: shorten the prompt or the captions"
            )
            spans.append(None)
            continue
        span = Span(start + 1, len(ids))
        for other in tokenizers[1:]:
            other_ids = _ids(other, used)
            if other_ids[start : start + len(ids)] != _ids(other, caption):  # type: ignore[arg-type]
                warnings.append(
                    f"caption {caption!r} tokenizes differently for the second text encoder "
                    "and is not steered"
                )
                span = None
                break
        spans.append(span)
    return used, spans, warnings


def _word_starts(text: str, caption: str) -> list[int]:
    """Character offsets where ``caption``'s words begin as whole words, in any case."""
    words = [re.escape(word) for word in caption.split()]
    pattern = re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)
    return [match.start() for match in pattern.finditer(text)]


def insert_before_captions(
    tokenizers: Sequence[CLIPTokenizer], prompt: str, tokens: dict[str, str]
) -> str:
    """``prompt`` with ``tokens[caption]`` written just before each caption, where steering finds it.

    The caption is located exactly as :func:`locate_captions` locates it for steering (a
    token span, never a substring: ``car`` is not inside ``carpet``, ``red car`` is inside
    ``A Red Car``), then the characters that spell that span get the token in front.
    Captions the prompt lacks are appended first, as sampling does.
    """
    captions = list(tokens)
    used, spans, _ = locate_captions(tokenizers, prompt, captions)
    main = tokenizers[0]
    edits: list[tuple[int, str]] = []
    for caption, span in zip(captions, spans, strict=True):
        if span is None:
            continue
        for offset in _word_starts(used, caption):  # the occurrence at the span's tokens
            if len(_ids(main, used[:offset])) + 1 == span.start:
                edits.append((offset, f"{tokens[caption]} "))
                break
    for offset, text in sorted(edits, reverse=True):
        used = used[:offset] + text + used[offset:]
    return used


def _past_limit(tokenizer: CLIPTokenizer, text: str, limit: int) -> str:
    """The words of ``text`` from the first one that does not fit in ``limit`` tokens on
    (a binary search over the words: the token count grows with the prefix)."""
    words = list(re.finditer(r"\S+", text))
    low, high = 0, len(words)  # the answer is the first word whose prefix is too long
    while low < high:
        middle = (low + high) // 2
        if len(_ids(tokenizer, text[: words[middle].end()])) > limit:
            high = middle
        else:
            low = middle + 1
    return text[words[low].start() :] if low < len(words) else ""


def token_limit(tokenizer: CLIPTokenizer) -> int:
    """How many prompt tokens the text encoder reads (its window less BOS and EOS)."""
    return tokenizer.model_max_length - 2


def count_tokens(tokenizer: CLIPTokenizer, text: str) -> int:
    """``text``'s tokens, without BOS and EOS."""
    return len(_ids(tokenizer, text))


@dataclass(frozen=True)
class PromptReader:
    """How one model reads a prompt: where its captions land (``locate``: the prompt with
    missing captions appended, each caption's place or None, warnings) and how many tokens
    it takes in. The engine steers with it; ``inspect`` and the render's early warnings
    predict with the same one, so the two cannot disagree."""

    locate: Callable[[str, Sequence[str | None]], tuple[str, list[Any], list[str]]]
    count: Callable[[str], int]
    limit: int


def clip_reader(tokenizers: Sequence[CLIPTokenizer]) -> PromptReader:
    """The reader of the UNet families (SD 1.x/2.x: one CLIP tokenizer; SDXL: two)."""
    return PromptReader(
        partial(locate_captions, tokenizers),
        partial(count_tokens, tokenizers[0]),
        token_limit(tokenizers[0]),
    )


# ---------------------------------------------------------------------------
# A model's tokenizers without its weights
# ---------------------------------------------------------------------------


def load_tokenizers(model: str) -> list[CLIPTokenizer]:
    """``model``'s tokenizers, resolved as :func:`~.models.load_components` resolves the name,
    without reading any weight; a :class:`ModelError` saying why when they are not here."""
    if model in TINY_FLOW_MODELS:
        raise ModelError(_FLOW_UNCHECKED)
    if model in TINY_MODELS:
        first = build_tiny_tokenizer()
        return (
            [first] if TINY_MODELS[model] == "sd1" else [first, build_tiny_tokenizer(pad_token="!")]
        )
    if model in PACKAGED_MODELS:
        return _folder_tokenizers(PACKAGED_MODELS[model])
    path = Path(model).expanduser()
    if path.is_dir():
        return _folder_tokenizers(path)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"{path}: a pickle checkpoint's tokenizer is read only when it loads")
        return _single_file_tokenizers(path)
    if typo := typo_of_known_name(model):
        raise ModelError(typo)
    if not in_hub_cache(model):
        raise ModelError(
            f"model {model!r} is not in the local Hugging Face cache (download it once with "
            f"`hf download {model}`) nor a file or folder here"
        )
    try:
        return _diffusers_tokenizers(model, json.loads(Path(in_hub_cache(model)).read_text()))
    except (OSError, ValueError) as error:
        raise ModelError(f"model {model!r}: its tokenizer cannot be read ({error})") from None


def _folder_tokenizers(folder: Path) -> list[CLIPTokenizer]:
    index = folder / "model_index.json"
    try:
        return _diffusers_tokenizers(str(folder), json.loads(index.read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder}: its tokenizer cannot be read ({error})") from None


#: Flux/SD3 read the prompt with T5 too, whose tokenizer needs the model's own code: the
#: render checks such a prompt once the model is loaded, before it samples.
_FLOW_UNCHECKED = "a Flux or SD3 model: its prompt is checked when render loads the model"


def _diffusers_tokenizers(source: str, index: dict) -> list[CLIPTokenizer]:
    if flow_family_of(index):
        raise ModelError(_FLOW_UNCHECKED)
    names = ["tokenizer"]
    if (index.get("tokenizer_2") or [None])[0] is not None:
        names.append("tokenizer_2")
    return [
        CLIPTokenizer.from_pretrained(source, subfolder=name, local_files_only=True)
        for name in names
    ]


def _single_file_tokenizers(path: Path) -> list[CLIPTokenizer]:
    """The tokenizers :func:`~.models.save_single_file` stores in the header (no tensor read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelError(f"{path}: not a readable .safetensors file ({error})") from None
    if "psd_collage.configs" not in metadata:
        raise ModelError(
            f"{path}: this checkpoint's tokenizer comes from the Hugging Face cache when it loads"
        )
    tokenizers = []
    try:
        for files in json.loads(metadata["psd_collage.configs"])["tokenizers"]:
            with tempfile.TemporaryDirectory() as tmp:
                for file_name, text in files.items():
                    (Path(tmp) / Path(file_name).name).write_text(text, encoding="utf-8")
                tokenizers.append(CLIPTokenizer.from_pretrained(tmp))
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise ModelError(f"{path}: its tokenizer cannot be read ({error})") from None
    return tokenizers

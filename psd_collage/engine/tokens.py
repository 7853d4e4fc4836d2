"""Prompt tokens: find each layer caption inside the prompt, and encode the prompt.

A caption is steered through the prompt tokens that spell it, so we locate it as a
subsequence of the prompt's token ids (CLIP's BPE encodes each word on its own, so
a caption tokenizes the same alone and in context). Captions missing from the
prompt are appended to it. A caption that still has no tokens inside CLIP's
77-token window is reported and not steered, never matched to the wrong tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTokenizer

from .models import ModelComponents


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
    limit = main.model_max_length - 2  # room for BOS and EOS
    spans: list[Span | None] = []
    warnings: list[str] = []
    for caption, ids, start in zip(captions, caption_ids, starts, strict=True):
        if not ids:
            spans.append(None)
            continue
        if start is None or start + len(ids) > limit:
            warnings.append(
                f"caption {caption!r} is beyond the {main.model_max_length}-token limit of the "
                "prompt and is not steered: shorten the prompt or the captions"
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


# ---------------------------------------------------------------------------
# Text embeddings
# ---------------------------------------------------------------------------


@dataclass
class PromptEmbeddings:
    """One prompt's embeddings: ``hidden`` (1, 77, D); SDXL also ``pooled`` (1, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def _token_tensor(tokenizer: CLIPTokenizer, text: str, device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        text,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def encode_ids(components: ModelComponents, ids: Sequence[torch.Tensor]) -> PromptEmbeddings:
    """Token ids (one (n, 77) tensor per tokenizer) -> embeddings, as the diffusers SD /
    SDXL pipelines build them; gradients flow (textual inversion trains through it).

    SD 1.x/2.x: the last hidden state. SDXL: both encoders' penultimate hidden states
    side by side, and the second encoder's pooled projection.
    """
    if components.kind != "sdxl":
        return PromptEmbeddings(components.text_encoders[0](ids[0])[0])
    hidden = []
    for encoder, input_ids in zip(components.text_encoders, ids, strict=True):
        out = encoder(input_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    pooled = out.text_embeds  # the last (second) encoder has the projection
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


@torch.no_grad()
def encode_prompt(
    components: ModelComponents, text: str, device: torch.device, *, zeros: bool = False
) -> PromptEmbeddings:
    """Encode with every text encoder (see :func:`encode_ids`). ``zeros`` gives SDXL's
    all-zero embeddings for an empty negative prompt. Never cached: textual inversion
    may add tokens between generations.
    """
    ids = [_token_tensor(tokenizer, text, device) for tokenizer in components.tokenizers]
    result = encode_ids(components, ids)
    if zeros:
        assert result.pooled is not None
        result = PromptEmbeddings(torch.zeros_like(result.hidden), torch.zeros_like(result.pooled))
    return result


def caption_starts(
    prompt_ids: Sequence[int], captions: Sequence[Sequence[int]]
) -> list[int | None]:
    """Where each caption's token ids start in ``prompt_ids`` (longest captions first, no
    shared tokens; None: not found). The transformer families locate captions in their T5
    tokens with it."""
    return _assign(list(prompt_ids), [list(ids) for ids in captions])

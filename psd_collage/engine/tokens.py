"""Prompt tokens: encode the prompt (with every text encoder) for sampling.

Locating each layer caption inside the prompt, which needs only the tokenizers, is
:mod:`psd_collage.engine.captions` (``inspect`` uses it without loading torch weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTokenizer

from .captions import Span, insert_before_captions, locate_captions
from .models import ModelComponents

__all__ = [
    "PromptEmbeddings",
    "Span",
    "encode_ids",
    "encode_prompt",
    "insert_before_captions",
    "locate_captions",
]


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

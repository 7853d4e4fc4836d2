"""Collage Diffusion's cross-attention bias: pull each layer's caption into the layer's area.

In every cross-attention layer (``attn2``), with ``S = QK^T / sqrt(d)`` and for each
prompt token ``j`` of layer ``i``'s caption::

    S[:, p, j] += w_pos_i * m_i(p)       * f(sigma) * max(S[:, :, tokens of i])
    S[:, p, j] -= w_neg_i * (1 - m_i(p)) * f(sigma) * max(S[:, :, tokens of i])
    f(sigma) = ln(ln(sigma + 1.01) + 1)

The max is over heads, pixels and the layer's tokens, per sample; only the conditional
half of classifier-free guidance is biased. Per attention resolution one tensor
``C[p, j] = w_pos m(p) - w_neg (1 - m(p))`` (0 for tokens of no layer) is built once per
generation, so each call only takes the max over the phrases' own score columns and
adds ``f(sigma) * C * max`` as the additive mask of fused SDPA: no Python loop over tokens.
Self-attention keeps diffusers' fused SDPA processor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, SlicedAttnProcessor

#: recorder(layer_name, probabilities of the conditional rows (B, heads, h*w, tokens), (h, w))
AttentionRecorder = Callable[[str, torch.Tensor, tuple[int, int]], None]


def sigma_weight(sigma: float) -> float:
    """f(sigma) = ln(ln(sigma + 1.01) + 1): strong steering early, almost none at the end."""
    return math.log(math.log(sigma + 1.01) + 1.0)


@dataclass
class SteeringState:
    """What every cross-attention processor of one UNet needs during one generation.

    ``masks`` are the phrases' visible masks (n, H, W) at image size, ``weights`` (n, 2)
    their (inside, outside) weights and ``token_phrase`` (tokens,) the phrase index of
    each prompt token (-1: none). Rows ``cond_start:`` of a UNet batch are conditional.
    """

    masks: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    token_phrase: torch.Tensor | None = None
    latent_size: tuple[int, int] = (0, 0)
    cond_start: int = 0
    factor: float = 0.0  # f(sigma) of the current step
    recorder: AttentionRecorder | None = None
    columns: torch.Tensor | None = None  # positions of steered tokens
    _bias: dict[int, tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=dict)
    _member: torch.Tensor | None = None
    _spread: torch.Tensor | None = None

    @property
    def steering(self) -> bool:
        return self.masks is not None and self.masks.shape[0] > 0

    def set_phrases(
        self,
        masks: torch.Tensor,
        weights: torch.Tensor,
        token_phrase: torch.Tensor,
        latent_size: tuple[int, int],
    ) -> None:
        self.masks, self.weights, self.token_phrase = masks, weights, token_phrase
        self.latent_size = latent_size
        self._bias.clear()
        # Only the phrases' own token columns are needed for their max.
        self.columns = torch.nonzero(token_phrase >= 0).flatten()
        phrases = torch.arange(masks.shape[0], device=token_phrase.device)[:, None]
        self._member = token_phrase[self.columns][None, :] == phrases  # (n, columns)
        self._spread = (token_phrase[None, :] == phrases).float()  # (n, tokens)
        # Every attention level's table now, outside the UNet: built inside it, the boolean
        # indexing is a torch.compile graph break in every cross-attention layer.
        tokens = token_phrase.shape[0]
        for level in range(4):
            h, w = -(-latent_size[0] // 2**level), -(-latent_size[1] // 2**level)
            self.bias(h * w, tokens, masks.device)

    def clear(self) -> None:
        """Back to plain attention (also drops the per-resolution tensors)."""
        self.masks = self.weights = self.token_phrase = self.columns = None
        self._member = self._spread = None
        self.cond_start, self.factor, self.latent_size = 0, 0.0, (0, 0)
        self._bias.clear()

    def grid(self, length: int) -> tuple[int, int]:
        """(h, w) of an attention level with ``length`` pixels, from the latent size."""
        height, width = self.latent_size
        for level in range(8):
            h, w = -(-height // 2**level), -(-width // 2**level)
            if h * w == length:
                return h, w
        raise RuntimeError(f"no attention grid of {length} pixels for latents {height}x{width}")

    def bias(
        self, length: int, tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """C (h*w, tokens) float32 and the grid, built once per resolution."""
        cached = self._bias.get(length)
        if cached is not None:
            return cached
        assert self.masks is not None and self.weights is not None and self.token_phrase is not None
        h, w = self.grid(length)
        masks = F.adaptive_avg_pool2d(self.masks[None].float(), (h, w))[0].flatten(1)  # (n, hw)
        inside, outside = self.weights[:, 0:1], self.weights[:, 1:2]
        per_phrase = inside * masks - outside * (1.0 - masks)  # (n, hw)
        phrase = self.token_phrase[:tokens].to(masks.device)
        table = torch.zeros(length, tokens, dtype=torch.float32, device=masks.device)
        steered = phrase >= 0
        table[:, steered] = per_phrase[phrase[steered]].T
        entry = (table.to(device), (h, w))
        self._bias[length] = entry
        return entry

    def phrase_max(self, column_scores: torch.Tensor) -> torch.Tensor:
        """max(S) over heads, pixels and each phrase's tokens, spread back per token: (B, tokens).

        ``column_scores`` (B, heads, pixels, columns) are the scores of :attr:`columns` only.
        """
        per_column = column_scores.amax(dim=(1, 2))  # (B, columns)
        lowest = torch.finfo(per_column.dtype).min
        member = self._member.to(per_column.device)
        per_phrase = torch.where(member[None], per_column[:, None, :], lowest).amax(-1)  # (B, n)
        return per_phrase @ self._spread.to(per_phrase.device)  # 0 for tokens of no phrase


class CollageCrossAttnProcessor:
    """diffusers attention processor for ``attn2`` that adds the collage bias.

    Without phrases (or for the unconditional rows) it is the fused SDPA path of
    diffusers' ``AttnProcessor2_0``; the conditional rows of a steered generation
    compute their (small: pixels x 77) score matrix explicitly to add the bias.
    """

    def __init__(self, state: SteeringState, name: str = "") -> None:
        self.state = state
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, pixels, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        state = self.state
        explicit = (
            encoder_hidden_states is not None
            and attention_mask is None
            and (state.steering or state.recorder is not None)
        )
        if not explicit:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )
        else:
            start = state.cond_start
            parts = []
            if start > 0:
                parts.append(
                    F.scaled_dot_product_attention(
                        query[:start], key[:start], value[:start], scale=attn.scale
                    )
                )
            parts.append(self._conditional(attn, query[start:], key[start:], value[start:]))
            out = torch.cat(parts) if len(parts) > 1 else parts[0]

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _conditional(
        self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        state = self.state
        pixels, tokens = query.shape[-2], key.shape[-2]
        bias = None
        if state.steering and state.factor != 0.0:
            assert state.columns is not None and state.token_phrase is not None
            if tokens != state.token_phrase.shape[0]:
                raise RuntimeError(f"{tokens} text tokens, expected {state.token_phrase.shape[0]}")
            table, _ = state.bias(pixels, tokens, query.device)  # C: (pixels, tokens)
            columns = state.columns.to(query.device)
            column_keys = key[:, :, columns].float().transpose(-1, -2)
            peak = state.phrase_max((query.float() @ column_keys) * attn.scale)  # (B, tokens)
            bias = (state.factor * table)[None, None] * peak[:, None, None, :]
        if state.recorder is None:  # fused attention with the bias as an additive mask
            mask = None if bias is None else bias.to(query.dtype)
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=attn.scale
            )
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        state.recorder(self.name, probs, state.grid(pixels))
        return probs.to(value.dtype) @ value


def install_processors(
    unet: UNet2DConditionModel, state: SteeringState, *, attention_slicing: bool = False
) -> None:
    """Give every ``attn2`` our processor; ``attn1`` keeps its own (sliced if asked).

    Slicing only matters for self-attention (pixels x pixels); the cross-attention
    score matrix is pixels x 77 and small at any resolution.
    """
    processors = {}
    heads = {name: module.heads for name, module in _attention_modules(unet)}
    for name, processor in unet.attn_processors.items():
        module_name = name.removesuffix(".processor")
        if module_name.endswith("attn2"):
            processors[name] = CollageCrossAttnProcessor(state, module_name)
        elif attention_slicing:
            processors[name] = SlicedAttnProcessor(max(1, heads.get(module_name, 2) // 2))
        else:
            processors[name] = processor
    unet.set_attn_processor(processors)


def _attention_modules(unet: UNet2DConditionModel) -> list[tuple[str, Attention]]:
    return [
        (name, module) for name, module in unet.named_modules() if isinstance(module, Attention)
    ]

"""Collage steering inside joint attention (MMDiT: SD3; double- and single-stream: Flux).

Transformers have no cross-attention: text and image tokens attend to one joint
sequence. The collage bias of :mod:`.attention` is added where an *image* token
(query) looks at a layer caption's *text* tokens (keys)::

    S[:, p, j] += f(sigma) * (w_pos m_i(p) - w_neg (1 - m_i(p))) * max(S[:, image, tokens of i])

Every other score is left alone, so the whole prompt stays visible to every image
token (as regional prompting for Flux, arXiv 2411.02395, keeps it) and text tokens
attend as trained. The same :class:`~.attention.SteeringState` holds the masks,
weights and token table; the image tokens form the latent grid at patch size 2.
Without phrases or a recorder the processors hand over to diffusers' own, so an
unsteered model computes exactly what diffusers computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .attention import SteeringState


@dataclass
class JointSteeringState(SteeringState):
    """The UNet steering state plus the text length of the joint sequence (Flux's
    single-stream blocks see text and image as one sequence)."""

    text_tokens: int = 0


def steered_attention(
    state: SteeringState,
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text: slice,
    image: slice,
) -> torch.Tensor:
    """Joint attention (B, heads, L, d) -> (B, heads, L, d) with the collage bias on the
    conditional rows' image-query x caption-key scores. ``text`` and ``image`` locate the
    two parts of the sequence (Flux puts the text first, SD3 last)."""
    start = state.cond_start
    parts = []
    if start > 0:
        parts.append(F.scaled_dot_product_attention(query[:start], key[:start], value[:start]))
    q, k, v = query[start:], key[start:], value[start:]
    text_out = F.scaled_dot_product_attention(q[:, :, text], k, v)
    image_out = _image_rows(state, name, q[:, :, image], k, v, text)
    ordered = [text_out, image_out] if text.start == 0 else [image_out, text_out]
    parts.append(torch.cat(ordered, dim=2))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _image_rows(
    state: SteeringState,
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text: slice,
) -> torch.Tensor:
    pixels, tokens = query.shape[-2], text.stop - text.start
    scale = query.shape[-1] ** -0.5
    mask = None
    if state.steering and state.factor != 0.0:
        assert state.columns is not None and state.token_phrase is not None
        if tokens != state.token_phrase.shape[0]:
            raise RuntimeError(f"{tokens} text tokens, expected {state.token_phrase.shape[0]}")
        table, _ = state.bias(pixels, tokens, query.device)  # (pixels, tokens)
        columns = state.columns.to(query.device) + text.start
        column_keys = key[:, :, columns].float().transpose(-1, -2)
        peak = state.phrase_max((query.float() @ column_keys) * scale)  # (B, tokens)
        bias = (state.factor * table)[None, None] * peak[:, None, None, :]  # (B, 1, P, T)
        mask = torch.zeros(
            bias.shape[0], 1, pixels, key.shape[-2], dtype=query.dtype, device=query.device
        )
        mask[..., text] = bias.to(query.dtype)
    if state.recorder is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    state.recorder(name, probs[..., text], state.grid(pixels))
    return probs.to(value.dtype) @ value


def _active(state: SteeringState) -> bool:
    return state.steering or state.recorder is not None


class FluxSteeredProcessor:
    """Processor for Flux's ``FluxAttention`` (double-stream blocks get the text as
    ``encoder_hidden_states``; single-stream blocks get one [text, image] sequence,
    whose text length the state knows)."""

    def __init__(self, state: JointSteeringState, name: str = "") -> None:
        self.state = state
        self.name = name
        self.plain = FluxAttnProcessor()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not _active(self.state) or attention_mask is not None:
            return self.plain(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            text_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            text_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            text_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([attn.norm_added_q(text_q), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_k), key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        length = query.shape[1]
        tokens = encoder_hidden_states.shape[1] if joint else self.state.text_tokens
        out = steered_attention(
            self.state,
            self.name,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            slice(0, tokens),
            slice(tokens, length),
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        text_out, image_out = out[:, :tokens], out[:, tokens:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class SD3SteeredProcessor:
    """Processor for SD3's joint ``attn`` (image tokens first, then the text)."""

    def __init__(self, state: JointSteeringState, name: str = "") -> None:
        self.state = state
        self.name = name
        self.plain = JointAttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not _active(self.state) or encoder_hidden_states is None or attention_mask is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch, pixels = hidden_states.shape[:2]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = (heads(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        context = encoder_hidden_states
        text_q, text_k = heads(attn.add_q_proj(context)), heads(attn.add_k_proj(context))
        text_v = heads(attn.add_v_proj(context))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        query = torch.cat([query, text_q], dim=2)
        key = torch.cat([key, text_k], dim=2)
        value = torch.cat([value, text_v], dim=2)
        length = query.shape[2]
        out = steered_attention(
            self.state, self.name, query, key, value, slice(pixels, length), slice(0, pixels)
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        image_out, text_out = out[:, :pixels], out[:, pixels:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, text_out


def install_joint_processors(
    transformer: torch.nn.Module, kind: str, state: JointSteeringState
) -> None:
    """Give every text-image attention of a Flux / SD3 transformer a steered processor.
    SD3.5's extra image-only self-attention (``attn2``) keeps its own."""
    processors = {}
    for name, processor in transformer.attn_processors.items():
        module_name = name.removesuffix(".processor")
        if kind == "flux":
            processors[name] = FluxSteeredProcessor(state, module_name)
        elif module_name.endswith(".attn"):
            processors[name] = SD3SteeredProcessor(state, module_name)
        else:
            processors[name] = processor
    transformer.set_attn_processor(processors)

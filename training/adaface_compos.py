"""Composition distillation (AdaFace paper §2.3-2.4, the trainer's ``--stage composition``): what the losses of
``training.adaface_losses`` are computed on.

One UNet pass over four prompts per photo (subject-single, subject-compos, class-single, class-compos) runs with a
capturing attention processor on every cross-attention layer (``attn2``), which records per layer

- the output after ``to_out`` [B, N, C] (the paper's cross-attention output features),
- the queries [B, N, inner] (the elastic face-preserving loss matches pixels by them),
- the attention probabilities softmax(QKᵀ/√d) [B, heads, N, 77].

The subject prompts hold 16 placeholder tokens where the class prompts hold the class word, so their attention
maps over the 77 positions do not line up. Our reading of the paper's "attention maps" is therefore the attention
mass each pixel gives the subject, ``subject_token_mass``: the sum of its probabilities over the subject's
positions (the 16 placeholder copies in a subject prompt, the class word's tokens in a class prompt) ->
[B, heads, N], where the subject is attended. The prompt embeddings are compared at the first end token, CLIP's
pooled position (``end_token_index``), which sums up the whole prompt whatever its layout. The prompts and the
photos a step uses: ``CompositionPrompts`` and ``CompositionBatch``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .diffusers_binding import around_attention


@dataclass
class CompositionPrompts:
    """The composition stage's prompts as token ids [1 + K, 77]: row 0 the single prompt, row 1 + k the
    compositional one with suffix k; and [1 + K, 77] masks of the subject's positions in each."""

    subject_ids: torch.Tensor  # --distill_prompt (+ ", " + suffix), the placeholder written 16 times
    class_ids: torch.Tensor  # the same with --class_word for the placeholder
    subject_positions: torch.Tensor  # the 16 placeholder copies
    class_positions: torch.Tensor  # the class word's tokens


@dataclass
class CompositionBatch:
    """One composition step's data (CPU tensors, noisy on the device)."""

    faces: torch.Tensor  # [B, 512] each photo's unit ArcFace vector
    noisy: torch.Tensor  # [B, 4, h, w] the photos' VAE latents noised at ``timesteps``
    timesteps: torch.Tensor  # [B]
    suffixes: torch.Tensor  # [B] indices into --composition_prompts
    masks: torch.Tensor  # [B, resolution, resolution] face masks in 0..1, in the photos' square crops


@dataclass
class CrossAttentionCapture:
    query: torch.Tensor  # [B, N, inner]: to_q of the (normed) hidden states, heads side by side
    probs: torch.Tensor  # [B, heads, N, T]
    output: torch.Tensor  # [B, N, C]: after to_out, before any residual


class CapturingCrossAttnProcessor:
    """diffusers' AttnProcessor (explicit softmax, the same result as the default scaled-dot-product processor)
    that also records the layer's queries, attention probabilities and output into ``store[name]``. Only the first
    call of a capture is kept (one UNet pass per capture)."""

    def __init__(self, name: str, store: dict):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        def attend(hidden_states, context, attention_mask, batch_size, sequence_length):
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
            probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key),
                                              attention_mask)
            out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(value)))
            out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
            if self.name not in self.store:
                heads_first = probs.view(out.shape[0], attn.heads, *probs.shape[1:])  # head_to_batch_dim: batch-major
                self.store[self.name] = CrossAttentionCapture(query=query, probs=heads_first, output=out)
            return out

        return around_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attend)


def cross_attention_layers(unet) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention layers (diffusers' ``attn2``) by module name."""
    return {name: module for name, module in unet.named_modules()
            if name.rsplit(".", 1)[-1] == "attn2" and hasattr(module, "set_processor")}


@contextlib.contextmanager
def capturing_cross_attention(unet):
    """While active, every cross-attention layer of ``unet`` records into the yielded dict {layer name:
    CrossAttentionCapture}; the original processors are back afterwards, also when the body raises."""
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError("the UNet has no cross-attention layers (attn2) to distil composition on")
    originals = {name: module.processor for name, module in layers.items()}
    store: dict[str, CrossAttentionCapture] = {}
    try:
        for name, module in layers.items():
            module.set_processor(CapturingCrossAttnProcessor(name, store))
        yield store
    finally:
        for name, module in layers.items():
            module.set_processor(originals[name])


def subject_token_mass(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """probs [B, heads, N, T], positions [B, T] (True at the subject's tokens) -> [B, heads, N]: each pixel's
    attention on the subject."""
    if probs.dim() != 4 or positions.shape != (probs.shape[0], probs.shape[-1]):
        raise ValueError(f"subject_token_mass wants probs [B, heads, N, T] and positions [B, T], got "
                         f"{tuple(probs.shape)} and {tuple(positions.shape)}")
    return torch.einsum("bhnt,bt->bhn", probs, positions.to(probs.dtype))


def replaced_positions(marked_ids: torch.Tensor, placeholder_id: int, word_ids: torch.Tensor,
                       word: list[int]) -> torch.Tensor:
    """Where a word's tokens are in ``word_ids`` [B, T] (a prompt with the word in place of the placeholder), found
    from ``marked_ids`` [B, T] (the same prompt with the placeholder written once per use): [B, T] bool.

    CLIP's tokenizer splits words apart before its BPE, so the tokens before each placeholder are the same in
    both; each earlier use shifts the later ones by len(word) - 1. Raises ValueError when the tokens found there
    are not the word's (e.g. the prompt was truncated)."""
    if marked_ids.shape != word_ids.shape or not word:
        raise ValueError(f"replaced_positions wants two [B, T] id tensors and a word, got {tuple(marked_ids.shape)}, "
                         f"{tuple(word_ids.shape)} and {word!r}")
    positions = torch.zeros(word_ids.shape, dtype=torch.bool)
    expected = torch.tensor(word, dtype=word_ids.dtype)
    for row in range(marked_ids.shape[0]):
        found = (marked_ids[row] == placeholder_id).nonzero().flatten().tolist()
        if not found:
            raise ValueError(f"row {row} has no placeholder token {placeholder_id}")
        for k, at in enumerate(found):
            start = at + k * (len(word) - 1)
            span = word_ids[row, start:start + len(word)].cpu()
            if len(span) != len(word) or not torch.equal(span, expected):
                raise ValueError(f"row {row}: the word's tokens {word} are not at {start} (found {span.tolist()})")
            positions[row, start:start + len(word)] = True
    return positions


def end_token_index(ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """[B] the first position of the end token in each row of ``ids`` [B, T] (CLIP's pooled position)."""
    at = ids == end_id
    if not at.any(dim=1).all():
        raise ValueError("a prompt has no end token (truncated?)")
    return at.int().argmax(dim=1)

"""Captions to the UNet's text conditioning, with the identity vector E_c in place of the identifier token.

The trainer's side of IDAdapter Text Encode: every text encoder of the base family gets its own E_c vector
(ComfyUI token-dict keys: SD1.5 "l", SD2.x "h", SDXL "l" and "g") at its input-embedding output, wherever the
identifier's token is. SD1.5/SD2.x condition on the one encoder's last hidden state; SDXL, as diffusers' SDXL
pipelines do, on both encoders' penultimate hidden states side by side, plus the second encoder's pooled
projection and the size/crop "time ids" as added conditioning.
"""

from __future__ import annotations

import contextlib

import torch

from ..nodes.arch import idadapter as ida
from ..nodes.arch.transfer import host_to_device
from ..nodes.errors import ConfigError


@contextlib.contextmanager
def identity_token(text_encoder, input_ids: torch.Tensor, identifier_id: int, vectors: torch.Tensor):
    """While active, the text encoder's input embedding of every identifier token is that row's E_c vector."""
    mask = (input_ids == identifier_id).unsqueeze(-1)

    def replace(module, args, output):
        return torch.where(mask.to(output.device), vectors[:, None, :].to(output.dtype), output)

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def placed_tokens(text_encoder, input_ids: torch.Tensor, placeholder_id: int, vectors: torch.Tensor):
    """While active, the text encoder's input embedding of the k-th placeholder token of each row is that row's
    vector k (mod K, ``vectors`` [B, K, D]): the prompt was written with each placeholder repeated K times, as
    AdaFace Encode writes it (``adaface.expand_placeholder``)."""
    at = input_ids == placeholder_id
    index = ((at.cumsum(dim=1) - 1).clamp(min=0) % vectors.shape[1]).unsqueeze(-1)

    def replace(module, args, output):
        chosen = torch.gather(vectors, 1, index.to(vectors.device).expand(-1, -1, vectors.shape[-1]))
        return torch.where(at.unsqueeze(-1).to(output.device), chosen.to(output.dtype), output)

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


class PromptEncoder:
    """``encoder(captions, e_c) -> (context [B, 77, C], added_cond_kwargs or None)`` for one base family."""

    def __init__(self, family: str, tokenizers: list, text_encoders: list, identifier: str, resolution: int):
        keys = tuple(ida.FAMILIES[family]["text_dims"])  # in the base model's order: text_encoder, text_encoder_2
        if len(tokenizers) != len(keys) or len(text_encoders) != len(keys):
            raise ConfigError(f"a {family} base has {len(keys)} text encoder(s) and tokenizer(s); got "
                              f"{len(text_encoders)} and {len(tokenizers)}")
        self.family, self.keys, self.identifier = family, keys, identifier
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.identifier_ids = [ida.identifier_token(identifier, tokenizer(identifier, add_special_tokens=False).input_ids, key)
                               for tokenizer, key in zip(tokenizers, keys)]
        # original size, crop top-left, target size: the dataset is already cropped to a square at training size
        self.time_ids = [resolution, resolution, 0, 0, resolution, resolution]

    def prompt(self, caption: str, class_noun: str) -> str:
        """The training prompt of a caption: the recipe's, as IDAdapter Text Encode makes it."""
        return ida.identity_prompt(caption, class_noun, self.identifier)

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids [B, 77] per text encoder, padded as the base model's pipelines pad them."""
        return [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids for tokenizer in self.tokenizers]

    def __call__(self, prompts: list[str], e_c: dict[str, torch.Tensor]):
        device = e_c[self.keys[0]].device
        hidden, pooled = [], None
        for ids, encoder, key, identifier_id in zip(self.tokenize(prompts), self.text_encoders, self.keys,
                                                    self.identifier_ids):
            ids = host_to_device(ids, device)
            with identity_token(encoder, ids, identifier_id, e_c[key]):
                out = encoder(ids, output_hidden_states=self.family == "sdxl")
            if self.family != "sdxl":
                return out[0], None
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output (CLIPTextModelWithProjection.text_embeds)
        time_ids = host_to_device(torch.tensor([self.time_ids] * len(prompts), dtype=pooled.dtype), device)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

"""Identity words in a prompt (IDAdapter's identifier, AdaFace's placeholder): each word's tokens in the output of
``clip.tokenize`` become its identity's vectors, for every text encoder of the CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.adaface import expand_placeholder
from ..arch.idadapter import identifier_token
from ..errors import ConfigError, PackError


@dataclass(frozen=True)
class IdentityWord:
    """One identity's word in a prompt and what replaces it: per text encoder key, K vectors [K, D]. The prompt
    carries the word once per place; it is written out K times there before tokenizing, and the K copies become the
    K vectors in order."""

    word: str
    vectors: dict[str, torch.Tensor]
    source: str  # the node that made it, for messages ("IDAdapter", "AdaFace")
    class_noun: str = ""  # IDAdapter: "<class noun> is <word>" is appended when the encode node appends phrases
    append_if_missing: bool = False  # AdaFace Encode's own placeholder: appended when the text lacks it (official)

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def word_token_ids(clip, word: str) -> dict[str, int]:
    """The single token id ``word`` is for each of the CLIP's text encoders."""
    ids = {}
    for key, rows in clip.tokenize(word, return_word_ids=True).items():
        ids[key] = identifier_token(word, [entry[0] for entry in rows[0] if len(entry) > 2 and entry[2] == 1], key)
    return ids


def tokenize_with_identities(clip, text: str, words: list[IdentityWord]) -> dict:
    """``clip.tokenize(text)`` with each identity word's tokens replaced by its vectors, for every text encoder.

    Each word must be its own (one-token) word, written where its person goes; several words are several people in
    one prompt ("sks and ohwx at a cafe"). Rows keep their length (ComfyUI adds position embeddings to all 77
    places), weights and word ids.
    """
    names = [w.word.lower() for w in words]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"several identities use the word {repeated[0]!r}: give each person its own word")
    found = {}
    for word in words:
        if word.count > 1 or word.append_if_missing:
            text, found[word.word] = expand_placeholder(text, word.word, word.count)
            if not found[word.word] and not word.append_if_missing:
                raise _not_in_text(word)
    tokens = clip.tokenize(text)
    for word in words:
        lacking = sorted(set(tokens) - set(word.vectors))
        if lacking:
            raise PackError(f"the CLIP has text encoders {sorted(tokens)}; the {word.source} identity {word.word!r} "
                            f"gives vectors for {sorted(word.vectors)}: it was made for another base model")
        for key, token_id in word_token_ids(clip, word.word).items():
            tokens, placed = place_identity_vectors(tokens, key, token_id, word.vectors[key])
            if placed == 0:
                raise _not_in_text(word)
            expected = word.count * max(found.get(word.word, 1), 1)
            if (word.word in found and placed != expected) or placed % word.count:
                raise PackError(f"the {word.source} identity's word {word.word!r} was found "
                                f"{placed / word.count:g} times among the text's tokens: write it as a separate "
                                "word where that person goes (or choose another word)")
    return tokens


def _not_in_text(word: IdentityWord) -> PackError:
    return PackError(f"the text does not contain {word.word!r} (an {word.source} identity's word): write it where "
                     "that person goes, as a separate word")


def _is_token(entry: tuple, token_id: int) -> bool:
    """Whether a ``clip.tokenize`` entry is that token (entries of ``embedding:`` names hold tensors instead)."""
    return isinstance(entry[0], int) and entry[0] == token_id


def place_identity_vectors(tokens: dict, key: str, placeholder_id: int, vectors: torch.Tensor) -> tuple[dict, int]:
    """Each placeholder entry of encoder ``key``'s rows, in reading order, becomes the next of ``vectors`` [K, D],
    starting over after K: the prompt was written with every placeholder repeated K times.

    Rows keep their length (ComfyUI adds position embeddings to all 77 places), weights and word ids. Returns the
    tokens and how many entries were replaced.
    """
    vectors = vectors.detach().float()
    placed = 0
    rows = []
    for row in tokens[key]:
        new_row = []
        for entry in row:
            if _is_token(entry, placeholder_id):
                entry = (vectors[placed % len(vectors)], *entry[1:])
                placed += 1
            new_row.append(entry)
        rows.append(new_row)
    return {**tokens, key: rows}, placed

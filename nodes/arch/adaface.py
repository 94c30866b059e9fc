"""AdaFace (Li et al., "AdaFace: A Versatile Face Encoder for Zero-Shot Diffusion Model Personalization"): the one
definition of its math, used by the ComfyUI nodes and the trainer.

- :class:`CLIPTextTransformer`: the CLIP text transformer in pure torch (token + position embeddings, pre-LN encoder
  layers with a causal mask, quick_gelu MLPs, final layer norm). Its state-dict keys are transformers'
  ``CLIPTextModel`` keys (``text_model.…``), so official weights map one to one. Each layer's keys and values may be
  multiplied (the official ``CLIPAttentionMKV``): ``k_proj``/``v_proj`` are ``Linear(D, D*m)`` and each token
  contributes m consecutive key/value sub-tokens.
- :func:`arc2face_prompt_embeds`: the Arc2Face ID encoder (a plain CLIP text transformer) turns an ArcFace vector
  into 16 image-prompt embeddings (output space).
- :func:`invert`: the prompt inverter (an MKV CLIP text transformer initialised from CLIP ViT-L/14) maps those into
  16 embeddings of the SD text encoder's *input* token-embedding space, which go into a prompt as ordinary tokens.

Tokenizing is not done here: the node tokenizes with ComfyUI's tokenizer, the trainer with transformers'; every
function takes token ids.

File format ``adaface/1``: safetensors; ``__metadata__`` holds ``format`` (``adaface/1``), ``family`` (``sd15``: the
inverter's output is SD1.5's 768-wide token space) and ``config``, the JSON of :class:`AdaFaceConfig`::

    {"num_id_vecs": 16, "hidden_state_layers": 3,
     "inverter": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_layers": 12,
                  "num_heads": 12, "max_positions": 77, "kv_multipliers": [2, 2, ..., 4]},
     "arc2face": {... the same fields, multipliers all 1 ...} or null}

Tensors: ``inverter.text_model.*`` (transformers' names), ``hidden_state_layer_weights`` [hidden_state_layers, 1],
optionally ``pad_embeddings`` [max_positions, hidden_size] (CLIP's embeddings of the padding prompt, positions
included: what ``strength`` < 1 mixes towards), and, when ``arc2face`` is not null, the ID encoder as
``arc2face.text_model.*``.

:func:`load_adaface` trusts nothing in a file: the format is checked first, every config field is typed and bounded,
the per-layer K/V multipliers are read from the header's k/v shapes and must agree with the config, the modules are
built on the ``meta`` device and compared with the header before anything is allocated, and NaN or infinite
weights are refused.

Over 450 lines: the network in transformers' layout (so official names map one to one), the placeholder words and
the adaface/1 reader, whose checks follow the network's shapes and change with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelFileError
from .files import check_shapes, materialized, metadata_json, open_safetensors, write_safetensors

FORMAT = "adaface/1"
FAMILY = "sd15"
ARCFACE_DIM = 512
# "photo of a " takes positions 0..3 (BOS, photo, of, a) in both templates, so the identity tokens start at 4
ID_START = 4
NUM_ID_VECS = 16
ARC2FACE_PROMPT_LENGTH = 22  # "photo of a id person" padded to 22 tokens, as the official encoder is run
LAYER_NORM_EPS = 1e-5
# CLIP ViT-L/14's vocabulary (the SD1.5 tokenizer's; the pack's ComfyUI tests check these against it): both
# templates are fixed, so their ids are constants and neither the nodes nor the trainer need a tokenizer for them.
START_TOKEN, END_TOKEN = 49406, 49407  # the end token also pads, as SD1.5's tokenizer does
PHOTO_OF_A = (1125, 539, 320)
ID_WORD_TOKEN, PERSON_TOKEN, COMMA_TOKEN = 1014, 2533, 267
INVERTER_PROMPT_LENGTH = 77


@dataclass
class TextModelConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    kv_multipliers: list[int] = field(default_factory=list)  # one per layer; empty means 1 everywhere

    def __post_init__(self):
        if not self.kv_multipliers:
            self.kv_multipliers = [1] * self.num_layers


@dataclass
class AdaFaceConfig:
    inverter: TextModelConfig
    arc2face: TextModelConfig | None = None
    num_id_vecs: int = NUM_ID_VECS
    hidden_state_layers: int = 3  # how many last hidden states the inverter mixes (the rows of the layer weights)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class CLIPAttentionMKV(nn.Module):
    """CLIP self-attention whose keys and values are multiplied by ``kv_multiplier`` (m).

    ``k_proj(x)`` [B, T, D*m] is viewed as [B, T*m, heads, head_dim], so token t gives the m sub-tokens
    t*m .. t*m+m-1 (the official layout); the causal mask is widened so that the sub-tokens of token j are
    visible exactly when token j is. With m = 1 this is CLIP's own attention.
    """

    def __init__(self, width: int, heads: int, kv_multiplier: int = 1):
        super().__init__()
        self.heads, self.kv_multiplier = heads, kv_multiplier
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width * kv_multiplier)
        self.v_proj = nn.Linear(width, width * kv_multiplier)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], visible [T, T] (True where a query may look at a key) -> [B, T, D]."""
        b, t, width = x.shape
        head_dim = width // self.heads
        q = self.q_proj(x).view(b, t, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, -1, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, -1, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible.repeat_interleave(self.kv_multiplier, dim=1))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, width))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, CLIP ViT-L/14's activation


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextModelConfig, kv_multiplier: int):
        super().__init__()
        self.self_attn = CLIPAttentionMKV(cfg.hidden_size, cfg.num_heads, kv_multiplier)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), visible)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, m) for m in cfg.kv_multipliers)


class _TextModel(nn.Module):
    """Holds the parameters under transformers' names (``embeddings``, ``encoder.layers``, ``final_layer_norm``)."""

    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)


class CLIPTextTransformer(nn.Module):
    """The CLIP text transformer with per-layer K/V multipliers; keys ``text_model.*`` as in transformers."""

    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.config = cfg
        self.text_model = _TextModel(cfg)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings of ``input_ids``, without positions (what ``input_token_embs`` replaces)."""
        return self.text_model.embeddings.token_embedding(input_ids)

    def hidden_states(self, input_ids: torch.Tensor | None = None,
                      input_token_embs: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Counted as transformers counts them: [embeddings output, output of layer 1, ..., of the last layer]."""
        if input_token_embs is None:
            input_token_embs = self.token_embeddings(input_ids)
        t = input_token_embs.shape[1]
        positions = self.text_model.embeddings.position_embedding.weight[:t]
        x = input_token_embs + positions
        visible = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        states = [x]
        for layer in self.text_model.encoder.layers:
            x = layer(x, visible)
            states.append(x)
        return states

    def forward(self, input_ids: torch.Tensor | None = None, input_token_embs: torch.Tensor | None = None,
                hidden_state_layer_weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids or [B, T, D] token embeddings -> [B, T, D].

        With ``hidden_state_layer_weights`` [L, 1] the output is the final layer norm of the last L hidden states
        mixed with weights w_l / sum(w) (the official inverter); otherwise of the last hidden state.
        """
        states = self.hidden_states(input_ids, input_token_embs)
        if hidden_state_layer_weights is None:
            return self.text_model.final_layer_norm(states[-1])
        weights = hidden_state_layer_weights / hidden_state_layer_weights.sum(dim=0, keepdim=True)
        last = torch.stack(states[-weights.shape[0]:])  # [L, B, T, D]
        return self.text_model.final_layer_norm((last * weights.view(-1, 1, 1, 1)).sum(0))


def _batched_ids(input_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[T] or [1, T] ids for every row, or [batch, T] as they are."""
    ids = input_ids.reshape(-1, input_ids.shape[-1])
    return ids.expand(batch, -1) if ids.shape[0] == 1 else ids


def _padded(ids: list[int], length: int) -> torch.Tensor:
    return torch.tensor(ids + [END_TOKEN] * (length - len(ids)))


def arc2face_prompt_ids(length: int = ARC2FACE_PROMPT_LENGTH) -> torch.Tensor:
    """"photo of a id person" padded to ``length`` ids: 22 where AdaFace runs the ID encoder, 77 where Arc2Face's
    own pipeline conditions its UNet on it."""
    return _padded([START_TOKEN, *PHOTO_OF_A, ID_WORD_TOKEN, PERSON_TOKEN, END_TOKEN], length)


def inverter_template_ids(num_id_vecs: int = NUM_ID_VECS) -> torch.Tensor:
    """"photo of a " + ", " * (num_id_vecs + 2), the official inverter's input: [77] ids."""
    ids = [START_TOKEN, *PHOTO_OF_A, *[COMMA_TOKEN] * (num_id_vecs + 2), END_TOKEN]
    return _padded(ids, INVERTER_PROMPT_LENGTH)


def _with_identity(encoder: CLIPTextTransformer, arcface: torch.Tensor, ids: torch.Tensor,
                   id_token_id: int) -> torch.Tensor:
    """The encoder's output for ``ids`` [N, T] with the unit ArcFace vector, zero-padded to the encoder's width, as
    the token embedding of "id"."""
    token_embs = encoder.token_embeddings(ids)
    identity = F.pad(F.normalize(arcface.to(token_embs), dim=-1), (0, token_embs.shape[-1] - arcface.shape[-1]))
    at_id = (ids == id_token_id).unsqueeze(-1)
    return encoder(input_token_embs=torch.where(at_id, identity.unsqueeze(1), token_embs))


def arc2face_prompt_embeds(encoder: CLIPTextTransformer, arcface: torch.Tensor, input_ids: torch.Tensor,
                           id_token_id: int) -> torch.Tensor:
    """ArcFace vectors [N, 512] -> Arc2Face image-prompt embeddings [N, 16, D].

    ``input_ids``: "photo of a id person" padded to 22 tokens ([22] or [N, 22]). The unit ArcFace vector,
    zero-padded to the encoder's width, replaces the token embedding of "id" (``id_token_id``); the output rows
    4..19 cover "id", "person", the end token and 13 pads.
    """
    # causal attention: rows up to 19 never see the tokens after them, so those are not run at all
    ids = _batched_ids(input_ids, arcface.shape[0])[:, :ID_START + NUM_ID_VECS].to(arcface.device)
    return _with_identity(encoder, arcface, ids, id_token_id)[:, ID_START:]


def arc2face_context(encoder: CLIPTextTransformer, arcface: torch.Tensor) -> torch.Tensor:
    """ArcFace vectors [N, 512] -> the Arc2Face UNet's text conditioning [N, 77, D], as its pipeline makes it:
    "photo of a id person" padded to 77 with the face at "id". Its rows 4..19 are :func:`arc2face_prompt_embeds`."""
    ids = _batched_ids(arc2face_prompt_ids(INVERTER_PROMPT_LENGTH), arcface.shape[0]).to(arcface.device)
    return _with_identity(encoder, arcface, ids, ID_WORD_TOKEN)


def invert(inverter: CLIPTextTransformer, face_prompt_embs: torch.Tensor, template_ids: torch.Tensor,
           hidden_state_layer_weights: torch.Tensor, pad_embeddings: torch.Tensor | None = None,
           strength: float = 1.0) -> torch.Tensor:
    """Image-prompt embeddings [N, K, D] -> K AdaFace embeddings [N, K, D] in the SD text encoder's input space.

    ``template_ids``: "photo of a " + ", " * (K + 2) padded to 77 tokens ([77] or [N, 77]); the K face embeddings
    replace the token embeddings at 4..4+K. With ``strength`` != 1 the result is mixed with the padding prompt's
    embeddings (``pad_embeddings`` [77, D]): ``out * strength + pad[4:4+K] * (1 - strength)``.
    """
    n, k = face_prompt_embs.shape[:2]
    # causal attention: the output rows 4..4+K never see the template's later tokens, so those are not run at all
    # (the same numbers at about a quarter of the cost)
    ids = _batched_ids(template_ids, n)[:, :ID_START + k].to(face_prompt_embs.device)
    token_embs = inverter.token_embeddings(ids).clone()
    token_embs[:, ID_START:] = face_prompt_embs.to(token_embs)
    out = inverter(input_token_embs=token_embs,
                   hidden_state_layer_weights=hidden_state_layer_weights.to(token_embs))[:, ID_START:]
    if strength == 1.0:
        return out
    if pad_embeddings is None:
        raise ConfigError("a strength other than 1 mixes the tokens with the padding embeddings, which this AdaFace "
                          "file does not hold: use strength 1, or a file written with pad_embeddings")
    return out * strength + pad_embeddings[ID_START:ID_START + k].to(out) * (1.0 - strength)


def mean_identity(arcface: torch.Tensor) -> torch.Tensor:
    """Several photos' ArcFace vectors [N, 512] -> their unit mean [1, 512] (the official avg_at_stage='id_emb')."""
    return F.normalize(F.normalize(arcface.float(), dim=-1).mean(0, keepdim=True), dim=-1)


class AdaFaceEncoder(nn.Module):
    """Face -> AdaFace tokens in one module (what the ComfyUI nodes hand to the memory manager).

    ``forward(arcface [N, 512], strength)`` -> [K, D]: the unit mean of one identity's ArcFace vectors goes through
    the Arc2Face ID encoder, then through the inverter.
    """

    def __init__(self, weights: "AdaFaceWeights", arc2face: CLIPTextTransformer):
        super().__init__()
        if weights.config.num_id_vecs != NUM_ID_VECS:
            raise ConfigError(f"this AdaFace inverter takes {weights.config.num_id_vecs} image-prompt embeddings; "
                              f"the Arc2Face ID encoder gives {NUM_ID_VECS}: use an arc2face inverter")
        width = arc2face.config.hidden_size
        if width != weights.config.inverter.hidden_size:
            raise ConfigError(f"the Arc2Face ID encoder is {width} wide, the inverter "
                              f"{weights.config.inverter.hidden_size}: use Arc2Face's CLIP-L encoder (768)")
        self.inverter, self.arc2face = weights.inverter, arc2face
        self.register_buffer("hidden_state_layer_weights", weights.hidden_state_layer_weights)
        self.register_buffer("pad_embeddings", weights.pad_embeddings)  # None: strength must stay 1

    def forward(self, arcface: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        identity = mean_identity(arcface).to(self.hidden_state_layer_weights.device)
        face_prompt = arc2face_prompt_embeds(self.arc2face, identity, arc2face_prompt_ids(), ID_WORD_TOKEN)
        return invert(self.inverter, face_prompt, inverter_template_ids(face_prompt.shape[1]),
                      self.hidden_state_layer_weights, self.pad_embeddings, strength)[0]


# A CLIP word is a run of letters: the tokenizer splits "z2", "z-axis" and "z's" into "z" and the rest, but keeps
# "zebra" whole, so the placeholder counts as present where no letter touches it (case-insensitively: CLIP lowercases).
def _placeholder_pattern(placeholder: str) -> re.Pattern:
    return re.compile(rf"(?<![^\W\d_]){re.escape(placeholder)}(?![^\W\d_])", re.IGNORECASE)


def check_placeholder(placeholder: str) -> str:
    if not re.fullmatch(r"[^\W\d_]+", placeholder):
        raise ConfigError(f"the placeholder {placeholder!r} must be one word of letters (default 'z'): it marks "
                          "where the identity's tokens go in the text")
    return placeholder


def expand_placeholder(text: str, placeholder: str, count: int, word: str | None = None) -> tuple[str, int]:
    """The text with each placeholder word written ``count`` times (or ``word`` in its place), or with ``count`` of
    them appended (after a space, as the official AdaFace wrapper appends its tokens) when there is none; and how
    many there were.

    Written out this way, the tokenizer lays the identity's ``count`` tokens into rows of 77 exactly as it lays
    out a ``count``-vector embedding, long prompts included; each occurrence is then swapped for its vector.
    """
    pattern = _placeholder_pattern(check_placeholder(placeholder))
    repeated = " ".join([word or placeholder] * count)
    expanded, found = pattern.subn(repeated, text)
    if found:
        return expanded, found
    return (f"{text.rstrip()} {repeated}" if text.strip() else repeated), 0


@dataclass
class AdaFaceWeights:
    """What an ``adaface/1`` file holds."""

    config: AdaFaceConfig
    inverter: CLIPTextTransformer
    hidden_state_layer_weights: torch.Tensor  # [L, 1]
    pad_embeddings: torch.Tensor | None = None  # [max_positions, D]
    arc2face: CLIPTextTransformer | None = None


_WRITER = "tools/convert_adaface.py (from an official .pt)"
_REWRITE = f"The file is damaged or was edited: write it again with {_WRITER}"
# Upper bounds of the config's integers: far above CLIP ViT-L/14 (49408 tokens, width 768, 12 layers of 12 heads,
# 77 positions; the paper's largest K/V multiplier is 8), low enough that a hostile config cannot make building
# the modules loop or allocate without end.
TEXT_MODEL_LIMITS = {"vocab_size": 262144, "hidden_size": 8192, "intermediate_size": 32768, "num_layers": 64,
                     "num_heads": 256, "max_positions": 4096}
MAX_KV_MULTIPLIER = 64


def _refusal(path: str, name: str, expected: str, got, fix: str = _REWRITE) -> ModelFileError:
    return ModelFileError(f"{path}: config field {name!r} is {got!r}, expected {expected}. {fix}")


def bounded_int(path: str, name: str, value, low: int, high: int, fix: str = _REWRITE) -> int:
    """``value`` when it is an integer from ``low`` to ``high``; else a refusal naming the field, ending in ``fix``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _refusal(path, name, f"an integer from {low} to {high}", value, fix)
    return value


def _text_model_config(raw, name: str, path: str, fix: str) -> TextModelConfig:
    if not isinstance(raw, dict) or set(raw) != {*TEXT_MODEL_LIMITS, "kv_multipliers"}:
        raise _refusal(path, name, f"a mapping with exactly {sorted({*TEXT_MODEL_LIMITS, 'kv_multipliers'})}",
                       raw if not isinstance(raw, dict) else sorted(raw), fix)
    values = {k: bounded_int(path, f"{name}.{k}", raw[k], 1, limit, fix) for k, limit in TEXT_MODEL_LIMITS.items()}
    if values["hidden_size"] % values["num_heads"]:
        raise _refusal(path, f"{name}.num_heads", f"a divisor of hidden_size ({values['hidden_size']})",
                       values["num_heads"], fix)
    multipliers = raw["kv_multipliers"]
    if not isinstance(multipliers, list) or len(multipliers) != values["num_layers"]:
        raise _refusal(path, f"{name}.kv_multipliers", f"a list of {values['num_layers']} integers (one per layer)",
                       multipliers, fix)
    multipliers = [bounded_int(path, f"{name}.kv_multipliers[{i}]", m, 1, MAX_KV_MULTIPLIER, fix)
                   for i, m in enumerate(multipliers)]
    return TextModelConfig(**values, kv_multipliers=multipliers)


def config_from_metadata(meta: dict[str, str], path: str) -> AdaFaceConfig:
    """The :class:`AdaFaceConfig` in an ``adaface/1`` file's metadata, every field checked."""
    if meta.get("family") != FAMILY:
        raise ModelFileError(f"{path}: family {meta.get('family')!r}, expected {FAMILY!r} (AdaFace's inverter "
                             f"writes SD1.5 token embeddings). {_REWRITE}")
    return checked_config(metadata_json(meta, path, "config", "the JSON AdaFace config", _REWRITE), path)


def checked_config(raw, path: str, fix: str = _REWRITE) -> AdaFaceConfig:
    """The :class:`AdaFaceConfig` of its JSON form (``asdict`` of one), every field typed and bounded: exactly what
    :func:`load_adaface` accepts. Refusals name ``path`` and end in ``fix`` (how to get a good file)."""
    known = {"inverter", "arc2face", "num_id_vecs", "hidden_state_layers"}
    if not isinstance(raw, dict) or set(raw) != known:
        raise _refusal(path, "config", f"a JSON object with exactly {sorted(known)}",
                       sorted(raw) if isinstance(raw, dict) else type(raw).__name__, fix)
    inverter = _text_model_config(raw["inverter"], "inverter", path, fix)
    arc2face = None if raw["arc2face"] is None else _text_model_config(raw["arc2face"], "arc2face", path, fix)
    if arc2face is not None:
        if set(arc2face.kv_multipliers) != {1}:
            raise _refusal(path, "arc2face.kv_multipliers", "1 for every layer (the ID encoder is plain CLIP)",
                           arc2face.kv_multipliers, fix)
        if arc2face.hidden_size != inverter.hidden_size or arc2face.max_positions < ARC2FACE_PROMPT_LENGTH:
            raise _refusal(path, "arc2face", f"hidden_size {inverter.hidden_size} (the inverter's) and at least "
                           f"{ARC2FACE_PROMPT_LENGTH} positions", raw["arc2face"], fix)
    num_id_vecs = bounded_int(path, "num_id_vecs", raw["num_id_vecs"], 1, inverter.max_positions - ID_START, fix)
    layers = bounded_int(path, "hidden_state_layers", raw["hidden_state_layers"], 1, inverter.num_layers + 1, fix)
    return AdaFaceConfig(inverter, arc2face, num_id_vecs, layers)


def checked_layer_weights(layer_weights: torch.Tensor, path: str, fix: str = _REWRITE) -> torch.Tensor:
    """``hidden_state_layer_weights`` when the mix can divide by their sum (a positive one)."""
    if not layer_weights.sum() > 0:
        raise ModelFileError(f"{path}: hidden_state_layer_weights {layer_weights.flatten().tolist()} sum to "
                             f"{layer_weights.sum().item()}, expected a positive sum. {fix}")
    return layer_weights


def kv_multipliers_from_shapes(shapes: dict[str, tuple], prefix: str, hidden_size: int, num_layers: int,
                               path: str) -> list[int]:
    """Each layer's K/V multiplier, read from the k_proj/v_proj weight shapes [hidden_size * m, hidden_size]."""
    multipliers = []
    for i in range(num_layers):
        layer = f"{prefix}text_model.encoder.layers.{i}.self_attn."
        missing = [proj for proj in ("k_proj", "v_proj") if f"{layer}{proj}.weight" not in shapes]
        if missing:
            raise ModelFileError(f"{path}: layer {i} has no {'/'.join(missing)} weight "
                                 f"('{layer}{missing[0]}.weight'). {_REWRITE}")
        rows = {proj: shapes[f"{layer}{proj}.weight"][0] for proj in ("k_proj", "v_proj")}
        if rows["k_proj"] != rows["v_proj"] or rows["k_proj"] % hidden_size or not rows["k_proj"]:
            raise ModelFileError(
                f"{path}: layer {i}'s k_proj/v_proj weights have {rows['k_proj']}/{rows['v_proj']} rows, expected "
                f"the same positive multiple of the width {hidden_size} for both (keys and values are multiplied "
                f"together). {_REWRITE}")
        multipliers.append(rows["k_proj"] // hidden_size)
    return multipliers


def save_adaface(weights: AdaFaceWeights, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Writes ``adaface/1`` atomically, in ``dtype``; refuses weights that are not finite in it."""
    tensors = {f"inverter.{k}": v for k, v in weights.inverter.state_dict().items()}
    tensors["hidden_state_layer_weights"] = weights.hidden_state_layer_weights
    if weights.pad_embeddings is not None:
        tensors["pad_embeddings"] = weights.pad_embeddings
    if weights.arc2face is not None:
        tensors.update({f"arc2face.{k}": v for k, v in weights.arc2face.state_dict().items()})
    tensors = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        # a weight beyond float16's range would be written as infinity, which load_adaface refuses
        if not torch.isfinite(tensor).all():
            fix = "the weights are damaged" if dtype == torch.float32 else \
                f"{dtype} holds magnitudes up to {torch.finfo(dtype).max:g}: write the file in float32"
            raise ConfigError(f"cannot write {path}: {name} holds NaN or infinite values in {dtype}; {fix}")
    write_safetensors(tensors, path, {"format": FORMAT, "family": FAMILY, "config": weights.config.to_json()})


def load_adaface(path: str) -> AdaFaceWeights:
    """Reads ``adaface/1``; nothing is allocated before the config and every tensor shape fit the file."""
    with open_safetensors(path, FORMAT, "AdaFace file", _WRITER) as f:
        cfg = config_from_metadata(f.metadata, path)
        inv = cfg.inverter
        in_file = kv_multipliers_from_shapes(f.shapes, "inverter.", inv.hidden_size, inv.num_layers, path)
        if in_file != inv.kv_multipliers:
            raise ModelFileError(f"{path}: the k/v weights say K/V multipliers {in_file}, the config says "
                                 f"{inv.kv_multipliers}. {_REWRITE}")
        with torch.device("meta"):  # shapes only, no memory: the real tensors come from the file
            inverter = CLIPTextTransformer(inv)
            arc2face = None if cfg.arc2face is None else CLIPTextTransformer(cfg.arc2face)
        expected = {f"inverter.{k}": tuple(v.shape) for k, v in inverter.state_dict().items()}
        expected["hidden_state_layer_weights"] = (cfg.hidden_state_layers, 1)
        if "pad_embeddings" in f.shapes:
            expected["pad_embeddings"] = (inv.max_positions, inv.hidden_size)
        if arc2face is not None:
            expected.update({f"arc2face.{k}": tuple(v.shape) for k, v in arc2face.state_dict().items()})
        check_shapes(path, f.shapes, expected, "its own config", _REWRITE)
        tensors = f.tensors()
    layer_weights = checked_layer_weights(tensors["hidden_state_layer_weights"], path)

    def module_from(module: CLIPTextTransformer, prefix: str) -> CLIPTextTransformer:
        return materialized(module, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    return AdaFaceWeights(
        config=cfg,
        inverter=module_from(inverter, "inverter."),
        hidden_state_layer_weights=layer_weights,
        pad_embeddings=tensors.get("pad_embeddings"),
        arc2face=None if arc2face is None else module_from(arc2face, "arc2face."),
    )

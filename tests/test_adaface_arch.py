import json
import math

import pytest
import torch
from safetensors.torch import save_file

from comfyui_idadapter.nodes.arch import adaface as ada
from comfyui_idadapter.nodes.errors import ConfigError, ModelFileError

HIDDEN, HEADS, VOCAB, POSITIONS = 32, 4, 100, 77


def tiny_text_config(layers: int = 3, multipliers=None) -> ada.TextModelConfig:
    return ada.TextModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=layers,
                               num_heads=HEADS, max_positions=POSITIONS, kv_multipliers=list(multipliers or []))


def random_model(cfg: ada.TextModelConfig, seed: int = 0) -> ada.CLIPTextTransformer:
    """Every parameter random (layer norms too), so a wrong key or a skipped term shows in the numbers."""
    torch.manual_seed(seed)
    model = ada.CLIPTextTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale_around = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            p.copy_(scale_around + torch.randn_like(p) * 0.3)
    return model.eval()


def random_ids(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def transformers_model(model: ada.CLIPTextTransformer):
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    # transformers 5 keeps CLIPTextModel's parts at the top (checkpoints written by transformers 4, the official
    # AdaFace files among them, say text_model.*; we keep those names)
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return hf.eval()


class FixedTokenEmbeddings(torch.nn.Module):
    """Stands in for transformers' token embedding, which its CLIP text model cannot be handed directly."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids):
        return self.embeddings


@torch.no_grad()
def test_plain_transformer_equals_transformers_clip_text_model():
    model = random_model(tiny_text_config(layers=3))
    hf = transformers_model(model)
    ids = random_ids()
    ref = hf(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(model(ids), ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    ours = model.hidden_states(ids)
    assert len(ours) == len(ref.hidden_states) == 4
    for a, b in zip(ours, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    embs = torch.randn(2, 20, HIDDEN)
    hf.embeddings.token_embedding = FixedTokenEmbeddings(embs)
    ref = hf(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(model(input_token_embs=embs), ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    for a, b in zip(model.hidden_states(input_token_embs=embs), ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def reference_mkv_attention(attn: ada.CLIPAttentionMKV, x: torch.Tensor) -> torch.Tensor:
    """The official CLIPAttentionMKV written out with explicit loops: token t's sub-token c is the c-th width-slice
    of k_proj(x)[t], visible to query i exactly when t <= i; plain softmax over every visible sub-token."""
    b, t, width = x.shape
    m, heads = attn.kv_multiplier, attn.heads
    d = width // heads
    q = attn.q_proj(x).view(b, t, heads, d)
    k = attn.k_proj(x).view(b, t, m, heads, d)
    v = attn.v_proj(x).view(b, t, m, heads, d)
    out = torch.zeros(b, t, heads, d)
    for i in range(t):
        keys = k[:, : i + 1].reshape(b, (i + 1) * m, heads, d)  # tokens 0..i, each with its m sub-tokens in order
        values = v[:, : i + 1].reshape(b, (i + 1) * m, heads, d)
        scores = torch.einsum("bhd,bshd->bhs", q[:, i], keys) / math.sqrt(d)
        out[:, i] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), values)
    return attn.out_proj(out.reshape(b, t, width))


@torch.no_grad()
def test_multiplied_attention_equals_reference_implementation():
    model = random_model(tiny_text_config(layers=4, multipliers=[2, 2, 4, 4]))
    x = torch.randn(2, 11, HIDDEN)
    for layer in model.text_model.encoder.layers:
        visible = torch.ones(11, 11, dtype=torch.bool).tril()
        torch.testing.assert_close(layer.self_attn(x, visible), reference_mkv_attention(layer.self_attn, x),
                                   rtol=1e-5, atol=1e-5)
    assert [tuple(layer.self_attn.k_proj.weight.shape) for layer in model.text_model.encoder.layers] == \
        [(64, 32), (64, 32), (128, 32), (128, 32)]


@torch.no_grad()
def test_repeating_keys_and_values_leaves_the_output_unchanged():
    """The official extend_weights with zero noise (weight.repeat(m, 1), bias.repeat(m)) duplicates every key/value
    sub-token; duplicated keys get equal softmax shares of the same values, so the output does not change (exactly
    in arithmetic; in fp32 the longer softmax sums round differently, about 2e-6 here)."""
    plain = random_model(tiny_text_config(layers=2))
    multipliers = [2, 4]
    extended = ada.CLIPTextTransformer(tiny_text_config(layers=2, multipliers=multipliers)).eval()
    state = plain.state_dict()
    for i, m in enumerate(multipliers):
        for proj in ("k_proj", "v_proj"):
            key = f"text_model.encoder.layers.{i}.self_attn.{proj}"
            state[f"{key}.weight"] = state[f"{key}.weight"].repeat(m, 1)
            state[f"{key}.bias"] = state[f"{key}.bias"].repeat(m)
    extended.load_state_dict(state)
    ids = random_ids()
    torch.testing.assert_close(extended(ids), plain(ids), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_layer_weight_mix_is_the_normalised_sum_of_the_last_hidden_states():
    model = random_model(tiny_text_config(layers=3))
    ids = random_ids()
    weights = torch.tensor([[1.0], [2.0], [5.0]])
    states = model.hidden_states(ids)
    expected = model.text_model.final_layer_norm((1 * states[1] + 2 * states[2] + 5 * states[3]) / 8)
    torch.testing.assert_close(model(ids, hidden_state_layer_weights=weights), expected, rtol=1e-5, atol=1e-6)
    # one weight: the last hidden state alone, i.e. the plain output
    torch.testing.assert_close(model(ids, hidden_state_layer_weights=torch.tensor([[0.3]])), model(ids))


@torch.no_grad()
def test_invert_places_face_embeddings_and_mixes_strength_with_pad_embeddings():
    inverter = random_model(tiny_text_config(layers=3, multipliers=[2, 2, 4]))
    faces = torch.randn(2, ada.NUM_ID_VECS, HIDDEN)
    template = random_ids(batch=1, length=POSITIONS)[0]
    weights = torch.tensor([[0.9], [0.95], [2.0]])
    pad = torch.randn(POSITIONS, HIDDEN)

    token_embs = inverter.token_embeddings(template).expand(2, -1, -1).clone()
    token_embs[:, 4:20] = faces
    expected = inverter(input_token_embs=token_embs, hidden_state_layer_weights=weights)[:, 4:20]
    out = ada.invert(inverter, faces, template, weights)
    assert out.shape == (2, 16, HIDDEN)
    torch.testing.assert_close(out, expected)
    # the template's own tokens at 4..19 play no part: the face embeddings replace them
    other = template.clone()
    other[4:20] = (other[4:20] + 1) % VOCAB
    torch.testing.assert_close(ada.invert(inverter, faces, other, weights), out)

    mixed = ada.invert(inverter, faces, template, weights, pad, strength=1.5)
    torch.testing.assert_close(mixed, out * 1.5 + pad[4:20] * -0.5)
    with pytest.raises(ConfigError, match="does not hold: use strength 1"):
        ada.invert(inverter, faces, template, weights, None, strength=1.5)


@torch.no_grad()
def test_arc2face_puts_the_unit_arcface_vector_at_the_id_token():
    encoder = random_model(tiny_text_config(layers=2))
    id_token = 7
    ids = torch.tensor([0, 11, 12, 13, id_token, 14, 99] + [99] * 15)  # "photo of a id person", padded to 22
    # the encoder is narrower than the real 768, so the test's "ArcFace" vector is narrower too
    arcface = torch.randn(3, 24) * 5
    out = ada.arc2face_prompt_embeds(encoder, arcface, ids, id_token)
    assert out.shape == (3, 16, HIDDEN)

    token_embs = encoder.token_embeddings(ids).expand(3, -1, -1).clone()
    token_embs[:, 4, :24] = arcface / arcface.norm(dim=-1, keepdim=True)
    token_embs[:, 4, 24:] = 0
    torch.testing.assert_close(out, encoder(input_token_embs=token_embs)[:, 4:20])
    # the vector's length does not matter, only its direction
    torch.testing.assert_close(ada.arc2face_prompt_embeds(encoder, arcface * 0.1, ids, id_token), out)


def tiny_weights(with_arc2face: bool = True, with_pad: bool = True) -> ada.AdaFaceWeights:
    inverter_cfg = tiny_text_config(layers=4, multipliers=[2, 2, 4, 4])
    arc2face_cfg = tiny_text_config(layers=2) if with_arc2face else None
    return ada.AdaFaceWeights(
        config=ada.AdaFaceConfig(inverter_cfg, arc2face_cfg),
        inverter=random_model(inverter_cfg, seed=3),
        hidden_state_layer_weights=torch.tensor([[0.9163], [0.9483], [2.0762]]),
        pad_embeddings=torch.randn(POSITIONS, HIDDEN) if with_pad else None,
        arc2face=random_model(arc2face_cfg, seed=4) if with_arc2face else None,
    )


@torch.no_grad()
@pytest.mark.parametrize("complete", [True, False])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, complete):
    weights = tiny_weights(with_arc2face=complete, with_pad=complete)
    path = str(tmp_path / "ada.safetensors")
    ada.save_adaface(weights, path)
    loaded = ada.load_adaface(path)
    assert loaded.config == weights.config
    assert loaded.inverter.config.kv_multipliers == [2, 2, 4, 4]
    assert torch.equal(loaded.hidden_state_layer_weights, weights.hidden_state_layer_weights)
    faces = torch.randn(1, 16, HIDDEN)
    template = random_ids(batch=1, length=POSITIONS)
    args = (faces, template, loaded.hidden_state_layer_weights)
    assert torch.equal(ada.invert(loaded.inverter, *args), ada.invert(weights.inverter, *args))
    if complete:
        assert torch.equal(loaded.pad_embeddings, weights.pad_embeddings)
        ids = random_ids(batch=1, length=ada.ARC2FACE_PROMPT_LENGTH)
        arcface = torch.randn(1, 24)
        assert torch.equal(ada.arc2face_prompt_embeds(loaded.arc2face, arcface, ids, 7),
                           ada.arc2face_prompt_embeds(weights.arc2face, arcface, ids, 7))
    else:
        assert loaded.pad_embeddings is None and loaded.arc2face is None


def written_file(tmp_path, weights, edit_tensors=None, edit_meta=None) -> str:
    """An adaface/1 file of ``weights`` with its tensors and metadata edited before writing."""
    path = str(tmp_path / "edited.safetensors")
    ada.save_adaface(weights, path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, path, metadata=meta)
    return path


def test_loader_refuses_another_format(tmp_path):
    path = written_file(tmp_path, tiny_weights(), edit_meta=lambda m: m.update(format="idadapter/1"))
    with pytest.raises(ModelFileError, match="format 'idadapter/1', expected 'adaface/1'"):
        ada.load_adaface(path)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", 10 ** 9, "inverter.hidden_size"),
    ("num_layers", 10 ** 6, "inverter.num_layers"),
    ("vocab_size", 2 ** 40, "inverter.vocab_size"),
    ("num_heads", 5, "inverter.num_heads"),
    ("num_layers", True, "inverter.num_layers"),
])
def test_loader_refuses_unbounded_or_mistyped_config_fast(tmp_path, field, value, message):
    def edit(meta):
        cfg = json.loads(meta["config"])
        cfg["inverter"][field] = value
        meta["config"] = json.dumps(cfg)

    path = written_file(tmp_path, tiny_weights(), edit_meta=edit)
    with pytest.raises(ModelFileError, match=message):
        ada.load_adaface(path)


def test_loader_refuses_multipliers_the_weights_do_not_have(tmp_path):
    def edit(meta):
        cfg = json.loads(meta["config"])
        cfg["inverter"]["kv_multipliers"] = [1, 1, 1, 1]
        meta["config"] = json.dumps(cfg)

    with pytest.raises(ModelFileError, match=r"K/V multipliers \[2, 2, 4, 4\], the config says \[1, 1, 1, 1\]"):
        ada.load_adaface(written_file(tmp_path, tiny_weights(), edit_meta=edit))


def test_loader_refuses_nan_tensors(tmp_path):
    def edit(tensors):
        tensors["inverter.text_model.final_layer_norm.weight"][3] = float("nan")

    with pytest.raises(ModelFileError, match="final_layer_norm.weight.*NaN"):
        ada.load_adaface(written_file(tmp_path, tiny_weights(), edit_tensors=edit))


def test_loader_refuses_kv_weights_that_are_not_a_multiple_of_the_width(tmp_path):
    def edit(tensors):
        key = "inverter.text_model.encoder.layers.1.self_attn.k_proj"
        tensors[f"{key}.weight"] = tensors[f"{key}.weight"][:48].contiguous()
        tensors[f"{key}.bias"] = tensors[f"{key}.bias"][:48].contiguous()

    with pytest.raises(ModelFileError, match="layer 1's k_proj/v_proj weights have 48/64 rows"):
        ada.load_adaface(written_file(tmp_path, tiny_weights(), edit_tensors=edit))


def test_loader_refuses_a_tensor_shape_the_config_does_not_give(tmp_path):
    def edit(tensors):
        tensors["hidden_state_layer_weights"] = torch.ones(4, 1)

    with pytest.raises(ModelFileError, match=r"hidden_state_layer_weights has shape \(4, 1\), expected \(3, 1\)"):
        ada.load_adaface(written_file(tmp_path, tiny_weights(), edit_tensors=edit))


def test_loader_refuses_layer_weights_that_cannot_be_normalised(tmp_path):
    def edit(tensors):
        tensors["hidden_state_layer_weights"] = torch.tensor([[1.0], [-1.0], [0.0]])

    with pytest.raises(ModelFileError, match="sum to 0.0, expected a positive sum"):
        ada.load_adaface(written_file(tmp_path, tiny_weights(), edit_tensors=edit))


def test_loader_names_a_missing_kv_weight(tmp_path):
    def edit(tensors):
        del tensors["inverter.text_model.encoder.layers.2.self_attn.v_proj.weight"]

    with pytest.raises(ModelFileError, match="layer 2 has no v_proj weight"):
        ada.load_adaface(written_file(tmp_path, tiny_weights(), edit_tensors=edit))

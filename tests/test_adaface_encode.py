"""AdaFace Encode's pure parts: the fixed templates, the face -> tokens module, placing the tokens in a prompt."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from comfyui_idadapter.nodes.arch import adaface as ada
from comfyui_idadapter.nodes.errors import ConfigError
from comfyui_idadapter.nodes.patches import identity_words
from test_adaface_arch import HIDDEN, POSITIONS, random_model, tiny_text_config

CLIP_VOCAB = 49408  # the templates use CLIP ViT-L/14's ids, up to its end token


def clip_vocab_config(**changes) -> ada.TextModelConfig:
    return dataclasses.replace(tiny_text_config(**changes), vocab_size=CLIP_VOCAB)


def test_templates_are_the_official_prompts_in_clip_ids():
    arc2face = ada.arc2face_prompt_ids()
    assert arc2face.shape == (ada.ARC2FACE_PROMPT_LENGTH,)
    # BOS photo of a id person EOS, then end tokens as padding; "id" at 4, where the output rows start
    assert arc2face[:7].tolist() == [49406, 1125, 539, 320, 1014, 2533, 49407]
    assert (arc2face[7:] == ada.END_TOKEN).all() and arc2face[ada.ID_START] == ada.ID_WORD_TOKEN

    template = ada.inverter_template_ids(16)
    assert template.shape == (77,)
    assert template[:4].tolist() == [49406, 1125, 539, 320]
    assert (template[4:22] == ada.COMMA_TOKEN).all()  # ", " * (16 + 2)
    assert (template[22:] == ada.END_TOKEN).all()


def tiny_encoder(with_pad=True) -> ada.AdaFaceEncoder:
    inverter_cfg = clip_vocab_config(layers=3, multipliers=[2, 1, 4])
    arc2face_cfg = clip_vocab_config(layers=2)
    weights = ada.AdaFaceWeights(
        config=ada.AdaFaceConfig(inverter_cfg, arc2face_cfg),
        inverter=random_model(inverter_cfg, seed=5),
        hidden_state_layer_weights=torch.tensor([[0.9], [1.0], [2.0]]),
        pad_embeddings=torch.randn(POSITIONS, HIDDEN) if with_pad else None,
    )
    return ada.AdaFaceEncoder(weights, random_model(arc2face_cfg, seed=6))


@torch.no_grad()
def test_encoder_is_arc2face_then_the_inverter_on_the_unit_mean_face():
    encoder = tiny_encoder()
    faces = F.normalize(torch.randn(3, 24), dim=-1)  # narrower than ArcFace's 512, as the tiny encoder is

    tokens = encoder(faces)

    assert tokens.shape == (ada.NUM_ID_VECS, HIDDEN)
    mean = F.normalize(faces.mean(0, keepdim=True), dim=-1)
    face_prompt = ada.arc2face_prompt_embeds(encoder.arc2face, mean, ada.arc2face_prompt_ids(), ada.ID_WORD_TOKEN)
    expected = ada.invert(encoder.inverter, face_prompt, ada.inverter_template_ids(), encoder.hidden_state_layer_weights)
    torch.testing.assert_close(tokens, expected[0])
    # unnormalised inputs are made unit first, so each photo counts the same however long its vector
    torch.testing.assert_close(encoder(faces * torch.tensor([[0.1], [3.0], [1.0]])), tokens)
    # the identity decides the tokens: another face gives others
    assert (encoder(F.normalize(torch.randn(1, 24), dim=-1)) - tokens).abs().max() > 1e-3
    pad = encoder.pad_embeddings[ada.ID_START:ada.ID_START + ada.NUM_ID_VECS]
    torch.testing.assert_close(encoder(faces, 0.5), tokens * 0.5 + pad * 0.5)


def test_encoder_refuses_parts_that_do_not_fit():
    encoder = tiny_encoder(with_pad=False)
    with pytest.raises(ConfigError, match="does not hold: use strength 1"):
        encoder(torch.randn(1, 24), 0.8)
    weights = ada.AdaFaceWeights(ada.AdaFaceConfig(encoder.inverter.config, num_id_vecs=4), encoder.inverter,
                                 encoder.hidden_state_layer_weights)
    with pytest.raises(ConfigError, match="takes 4 image-prompt embeddings; the Arc2Face ID encoder gives 16"):
        ada.AdaFaceEncoder(weights, encoder.arc2face)
    weights.config.num_id_vecs = 16
    wide = random_model(dataclasses.replace(clip_vocab_config(layers=1), hidden_size=48, num_heads=4))
    with pytest.raises(ConfigError, match="encoder is 48 wide, the inverter 32"):
        ada.AdaFaceEncoder(weights, wide)


@pytest.mark.parametrize("text, expanded, found", [
    ("a photo of z in the snow", "a photo of z z z in the snow", 1),
    ("(z:1.2), Z", "(z z z:1.2), z z z", 2),  # inside weight syntax; CLIP lowercases
    ("z2 z-axis z's", "z z z2 z z z-axis z z z's", 3),  # the tokenizer splits these into z + rest
    ("zebra crazy", "zebra crazy z z z", 0),  # z inside a word is not the placeholder: appended
    ("", "z z z", 0),
])
def test_placeholder_is_written_once_per_token_or_appended(text, expanded, found):
    assert ada.expand_placeholder(text, "z", 3) == (expanded, found)


@pytest.mark.parametrize("placeholder", ["", "z1", "two words", "<z>"])
def test_placeholder_must_be_one_word_of_letters(placeholder):
    with pytest.raises(ConfigError, match="one word of letters"):
        ada.expand_placeholder("a photo of z", placeholder, 16)


def test_vectors_replace_the_placeholder_entries_in_reading_order_across_rows():
    z = 345
    other = torch.ones(8)  # an embedding: entry the user wrote, left alone
    rows = [[(49406, 1.0, 0), (320, 1.0, 1), (z, 1.2, 2), (z, 1.2, 3), (other, 1.0, 4)],
            [(49406, 1.0, 0), (z, 1.0, 5), (z, 1.0, 6), (49407, 1.0, 0)]]
    vectors = torch.arange(16.0).reshape(2, 8)

    placed_tokens, placed = identity_words.place_identity_vectors({"l": rows}, "l", z, vectors)

    out = placed_tokens["l"]
    assert placed == 4
    assert [len(r) for r in out] == [5, 4]  # rows keep their length
    for (row, col), k in {(0, 2): 0, (0, 3): 1, (1, 1): 0, (1, 2): 1}.items():
        assert torch.equal(out[row][col][0], vectors[k]) and out[row][col][1:] == rows[row][col][1:]
    assert out[0][4][0] is other and out[0][:2] == rows[0][:2] and out[1][3] == rows[1][3]
    assert rows[0][2][0] == z  # the input is not edited

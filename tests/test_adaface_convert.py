"""Official AdaFace checkpoints and the Arc2Face ID encoder, converted into this pack's adaface/1 files.

The official checkpoints are re-created with the stand-ins of test_adaface_official (the official class paths, key
names and shapes, at width 32); the Arc2Face encoder is a tiny transformers CLIPTextModel saved as transformers 5
writes it (model.safetensors) and as transformers 4.x wrote the released one (pytorch_model.bin, `text_model.` keys).
"""

import json
import os
import pathlib
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from comfyui_idadapter.nodes.arch import adaface as ada
from comfyui_idadapter.nodes.arch.arc2face import load_arc2face_encoder
from comfyui_idadapter.nodes.errors import ModelFileError
from test_adaface_arch import FixedTokenEmbeddings
from test_adaface_official import POSITIONS, WIDTH, WritesMarker

VOCAB, HEADS = 100, 4
ID_TOKEN = 7
ARC2FACE_IDS = torch.tensor([0, 11, 12, 13, ID_TOKEN, 14, 2] + [2] * 15)  # "photo of a id person", 22 tokens


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (layer norms too), so that a weight in the wrong place shows in the numbers."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            around = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            p.copy_(around + torch.randn_like(p) * 0.3)
    return module


def tiny_arc2face(seed: int = 5):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    return randomized(model, seed).eval()


def save_encoder(model, folder: pathlib.Path, form: str) -> pathlib.Path:
    """The encoder folder as transformers 5 writes it (safetensors) or as transformers 4.x wrote Arc2Face's (bin)."""
    if form == "safetensors":
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        state = {f"text_model.{k}": v for k, v in model.state_dict().items()}
        state["text_model.embeddings.position_ids"] = torch.arange(POSITIONS).unsqueeze(0)
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def id_prompt_reference(model, arcface: torch.Tensor) -> torch.Tensor:
    """Arc2Face's projection (official-checkpoints.md §2.2) run by transformers: the unit ArcFace vector, zero-padded
    to the width, replaces the "id" token's embedding; rows 4..19 of the output."""
    ids = ARC2FACE_IDS.expand(arcface.shape[0], -1)
    original = model.embeddings.token_embedding
    token_embs = original(ids).clone()
    token_embs[:, 4] = F.pad(F.normalize(arcface, dim=-1), (0, WIDTH - arcface.shape[1]))
    model.embeddings.token_embedding = FixedTokenEmbeddings(token_embs)
    try:
        return model(input_ids=ids).last_hidden_state[:, 4:20]
    finally:
        model.embeddings.token_embedding = original


@torch.no_grad()
@pytest.mark.parametrize("form", ["safetensors", "bin"])
@pytest.mark.parametrize("point_at", ["folder", "weights file"])
def test_arc2face_encoder_loads_and_matches_transformers(tmp_path, form, point_at):
    model = tiny_arc2face()
    folder = save_encoder(model, tmp_path / "encoder", form)
    path = folder if point_at == "folder" else folder / ("model.safetensors" if form == "safetensors" else
                                                         "pytorch_model.bin")

    encoder = load_arc2face_encoder(str(path))

    assert encoder.config == ada.TextModelConfig(VOCAB, WIDTH, 64, 2, HEADS, POSITIONS)
    ids = torch.randint(0, VOCAB, (2, 22), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(encoder(ids), model(input_ids=ids).last_hidden_state, rtol=0, atol=1e-5)
    arcface = torch.randn(3, 24) * 4
    torch.testing.assert_close(ada.arc2face_prompt_embeds(encoder, arcface, ARC2FACE_IDS, ID_TOKEN),
                               id_prompt_reference(model, arcface), rtol=0, atol=1e-5)


@pytest.fixture
def encoder_folder(tmp_path):
    return save_encoder(tiny_arc2face(), tmp_path / "encoder", "safetensors")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_encoder_folder_without_config_or_weights_says_what_is_expected(encoder_folder):
    os.remove(encoder_folder / "config.json")
    with pytest.raises(ModelFileError, match="has no config.json.*folder 'encoder' of FoivosPar/Arc2Face"):
        load_arc2face_encoder(str(encoder_folder))
    with pytest.raises(ModelFileError, match="has no config.json"):
        load_arc2face_encoder(str(encoder_folder / "model.safetensors"))
    empty_folder = encoder_folder.parent / "empty"
    empty_folder.mkdir()
    (empty_folder / "config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="holds no model.safetensors or pytorch_model.bin.*FoivosPar/Arc2Face"):
        load_arc2face_encoder(str(empty_folder))
    with pytest.raises(ModelFileError, match="not found"):
        load_arc2face_encoder(str(encoder_folder.parent / "nowhere"))


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu', expected 'quick_gelu'"),
    ({"layer_norm_eps": 1e-6}, "layer_norm_eps is 1e-06, expected 1e-05"),
    ({"max_position_embeddings": 16}, "max_position_embeddings is 16, expected at least 22"),
    ({"num_attention_heads": 5}, "num_attention_heads 5 does not divide hidden_size 32"),
    ({"hidden_size": "32"}, "'hidden_size' is '32', expected an integer from 1 to 8192"),
    ({"vocab_size": None}, "'vocab_size' is None, expected an integer"),
])
def test_encoder_config_is_checked(encoder_folder, changes, message):
    edit_config(encoder_folder, **changes)
    with pytest.raises(ModelFileError, match=message):
        load_arc2face_encoder(str(encoder_folder))


def test_encoder_config_that_is_not_a_json_object_is_refused(encoder_folder):
    (encoder_folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="holds a JSON list, expected an object"):
        load_arc2face_encoder(str(encoder_folder))


def test_huge_layer_count_is_refused_before_anything_is_built(encoder_folder):
    edit_config(encoder_folder, num_hidden_layers=10 ** 9)
    start = time.monotonic()
    with pytest.raises(ModelFileError, match="'num_hidden_layers' is 1000000000, expected an integer from 1 to 64"):
        load_arc2face_encoder(str(encoder_folder))
    assert time.monotonic() - start < 1


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"encoder.layers.1.mlp.fc1.weight": torch.ones(48, WIDTH)}),
     r"text_model.encoder.layers.1.mlp.fc1.weight has shape \(48, 32\), expected \(64, 32\)"),
    (lambda t: t.pop("final_layer_norm.bias"), r"missing \['text_model.final_layer_norm.bias'\]"),
    (lambda t: t.update({"encoder.layers.2.mlp.fc1.weight": torch.ones(64, WIDTH)}),
     r"unexpected tensors \['text_model.encoder.layers.2.mlp.fc1.weight'\]"),
    (lambda t: t["encoder.layers.0.self_attn.q_proj.weight"].__setitem__((1, 2), float("nan")),
     "'encoder.layers.0.self_attn.q_proj.weight' holds NaN"),
    (lambda t: t.update({"text_model.final_layer_norm.bias": torch.zeros(WIDTH)}),
     "'text_model.final_layer_norm.bias' twice"),
    (lambda t: t.update({"final_layer_norm.bias": torch.zeros(WIDTH, dtype=torch.int32)}), "expected floating-point"),
], ids=["misshaped", "missing", "unexpected", "nan", "twice", "integers"])
def test_encoder_weights_are_checked(encoder_folder, edit, message):
    edit_weights(encoder_folder, edit)
    with pytest.raises(ModelFileError, match=message):
        load_arc2face_encoder(str(encoder_folder))


def test_encoder_bin_naming_code_is_refused_without_running_it(tmp_path, encoder_folder):
    os.remove(encoder_folder / "model.safetensors")
    marker = tmp_path / "marker"
    torch.save({"text_model.final_layer_norm.bias": WritesMarker(os.system, f"touch {marker}")},
               encoder_folder / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="cannot be read as a tensors-only PyTorch file"):
        load_arc2face_encoder(str(encoder_folder))
    assert not marker.exists()

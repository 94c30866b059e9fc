"""Official AdaFace checkpoints and the Arc2Face ID encoder, converted into this pack's adaface/1 files.

The official checkpoints are re-created with the stand-ins of test_adaface_official (the official class paths, key
names and shapes, at width 32, and the transformers 4.x tokenizer as made with or without ftfy installed); the
Arc2Face encoder is a tiny transformers CLIPTextModel saved as transformers 5 writes it (model.safetensors) and as
transformers 4.x wrote the released one (pytorch_model.bin, `text_model.` keys).
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from comfyui_idadapter.nodes.arch import adaface as ada
from comfyui_idadapter.nodes.arch.adaface_official import (convert_official_adaface, read_official_adaface,
                                                           to_adaface_weights)
from comfyui_idadapter.nodes.arch.arc2face import load_arc2face_encoder
from comfyui_idadapter.nodes.errors import ConfigError, ModelFileError
from test_adaface_arch import FixedTokenEmbeddings
from test_adaface_official import (POSITIONS, WIDTH, WritesMarker, official_classes, save_official,
                                   tokenizer_forms)

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB, HEADS = 100, 4  # the stand-ins' vocabulary and CLIPTextConfig.num_attention_heads
MULTIPLIERS = [2] * 6 + [4] * 6  # two official expansions over 12 layers
# "photo of a " + ", " * (16 + 2) and the end token, in the stand-ins' vocabulary, padded with the end token
TEMPLATE = torch.tensor([0, 11, 12, 13] + [5] * 18 + [2] * (POSITIONS - 22))
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


def arc2face_generator(package: str, seed: int = 0, multipliers=MULTIPLIERS, with_ftfy: bool = False):
    generator = official_classes(package, with_ftfy)(16, multipliers)
    randomized(generator.prompt2token_proj, seed)
    return generator


def reference_inverter(generator) -> ada.CLIPTextTransformer:
    """Our module holding the stand-in's CLIP weights as they are, built from the sizes the test knows."""
    cfg = ada.TextModelConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                              num_layers=len(MULTIPLIERS), num_heads=HEADS, max_positions=POSITIONS,
                              kv_multipliers=MULTIPLIERS)
    model = ada.CLIPTextTransformer(cfg)
    model.load_state_dict(generator.prompt2token_proj.state_dict())
    return model.eval()


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
@tokenizer_forms
@pytest.mark.parametrize("package", ["adaface", "ldm.modules"])
@pytest.mark.parametrize("joint", [False, True], ids=["single", "joint+encoder"])
def test_official_checkpoint_converts_to_the_same_tokens(tmp_path, package, joint, with_ftfy):
    generator = arc2face_generator(package, with_ftfy=with_ftfy)
    generator.hidden_state_layer_weights.copy_(torch.tensor([[0.5], [1.5], [3.0]]))
    checkpoint, out = str(tmp_path / "official.pt"), str(tmp_path / "adaface.safetensors")
    encoder = None
    if joint:
        consistent_id = randomized(official_classes(package, with_ftfy)(4, [1] * 12), seed=9)
        save_official(checkpoint, nn.ModuleList([consistent_id, generator]))
        encoder = tiny_arc2face()
        save_encoder(encoder, tmp_path / "encoder", "bin")
    else:
        save_official(checkpoint, generator)

    convert_official_adaface(checkpoint, out, str(tmp_path / "encoder") if joint else None, dtype=torch.float32)
    loaded = ada.load_adaface(out)

    assert loaded.config.inverter == ada.TextModelConfig(VOCAB, WIDTH, 2 * WIDTH, 12, HEADS, POSITIONS, MULTIPLIERS)
    assert loaded.config.num_id_vecs == 16 and loaded.config.hidden_state_layers == 3
    assert torch.equal(loaded.hidden_state_layer_weights, torch.tensor([[0.5], [1.5], [3.0]]))
    assert torch.equal(loaded.pad_embeddings, generator.pad_embeddings)
    reference = reference_inverter(generator)
    faces = torch.randn(2, 16, WIDTH)
    for strength in (1.0, 0.5):
        expected = ada.invert(reference, faces, TEMPLATE, generator.hidden_state_layer_weights,
                              generator.pad_embeddings, strength)
        got = ada.invert(loaded.inverter, faces, TEMPLATE, loaded.hidden_state_layer_weights, loaded.pad_embeddings,
                         strength)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if joint:
        arcface = torch.randn(2, 24)
        torch.testing.assert_close(ada.arc2face_prompt_embeds(loaded.arc2face, arcface, ARC2FACE_IDS, ID_TOKEN),
                                   id_prompt_reference(encoder, arcface), rtol=0, atol=1e-5)
    else:
        assert loaded.arc2face is None


@pytest.fixture
def official(tmp_path):
    """A freshly read single-form checkpoint (its dict may be edited by the test)."""
    path = str(tmp_path / "official.pt")
    save_official(path, arc2face_generator("adaface"))
    return read_official_adaface(path)


def test_reader_carries_what_builds_the_module(official):
    assert official.num_heads == HEADS and official.multipliers == MULTIPLIERS and official.num_id_vecs == 16
    assert official.path.endswith("official.pt")


def test_head_count_comes_from_the_pickled_config(tmp_path):
    generator = arc2face_generator("adaface")
    generator.prompt2token_proj.config.num_attention_heads = 8
    path = str(tmp_path / "eight.pt")
    save_official(path, generator)
    official = read_official_adaface(path)
    assert official.num_heads == 8
    assert to_adaface_weights(official).config.inverter.num_heads == 8
    # without a config the heads are CLIP's 64 wide, which a width of 32 cannot hold
    del generator.prompt2token_proj.config
    save_official(path, generator)
    with pytest.raises(ModelFileError, match="num_attention_heads dividing the width 32.*head width 64"):
        read_official_adaface(path)


@torch.no_grad()
def test_tensors_the_official_inference_ignores_are_dropped(official):
    plain = to_adaface_weights(official)
    state = official.state_dict
    assert any(name.startswith("obj_proj_in.") for name in state)  # the stand-in's non-face projection
    state["prompt2token_proj.text_model.embeddings.position_ids"] = torch.arange(POSITIONS).unsqueeze(0)
    state["static_img_suffix_embs"] = torch.randn(1, 4, WIDTH)
    state["layerwise_proj.0.weight"] = torch.randn(WIDTH, WIDTH)
    state["hidden_state_layer_weights_grad_scaler._alpha"] = torch.tensor(5.0)
    state["latent_queries"] = torch.randn(1, 64, WIDTH)
    weights = to_adaface_weights(official)
    for name, tensor in plain.inverter.state_dict().items():
        assert torch.equal(weights.inverter.state_dict()[name], tensor), name
    assert all(t.dtype == torch.float32 for t in weights.inverter.state_dict().values())


@torch.no_grad()
def test_float16_checkpoints_convert_to_float32(tmp_path):
    generator = arc2face_generator("adaface").half()
    path = str(tmp_path / "half.pt")
    save_official(path, generator)
    weights = to_adaface_weights(read_official_adaface(path))
    for name, tensor in generator.prompt2token_proj.state_dict().items():
        converted = weights.inverter.state_dict()[name]
        assert converted.dtype == torch.float32 and torch.equal(converted, tensor.float()), name
    assert weights.hidden_state_layer_weights.dtype == weights.pad_embeddings.dtype == torch.float32
    assert torch.equal(weights.hidden_state_layer_weights, generator.hidden_state_layer_weights.float())


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"prompt2token_proj.text_model.encoder.layers.3.self_attn.rotary.weight": torch.ones(2)}),
     r"unexpected tensors \['prompt2token_proj.text_model.encoder.layers.3.self_attn.rotary.weight'\]"),
    (lambda s: s.pop("prompt2token_proj.text_model.final_layer_norm.bias"),
     r"missing \['prompt2token_proj.text_model.final_layer_norm.bias'\]"),
    (lambda s: s.update({"prompt2token_proj.text_model.encoder.layers.5.mlp.fc2.weight": torch.ones(WIDTH, 48)}),
     r"layers.5.mlp.fc2.weight has shape \(32, 48\), expected \(32, 64\)"),
    (lambda s: s["prompt2token_proj.text_model.encoder.layers.7.self_attn.v_proj.bias"].__setitem__(3, float("nan")),
     "layers.7.self_attn.v_proj.bias holds NaN"),
    (lambda s: s["hidden_state_layer_weights"].__setitem__(0, float("inf")), "hidden_state_layer_weights holds NaN"),
    (lambda s: s.pop("prompt2token_proj.text_model.embeddings.token_embedding.weight"),
     "expected a matrix prompt2token_proj.text_model.embeddings.token_embedding.weight"),
], ids=["unknown", "missing", "misshaped", "nan", "inf-layer-weights", "no-token-embedding"])
def test_conversion_refuses_what_the_inverter_cannot_be_built_from(official, edit, message):
    edit(official.state_dict)  # hidden_state_layer_weights is the reader's tensor of that name
    with pytest.raises(ModelFileError, match=message):
        to_adaface_weights(official)


def test_pad_embeddings_are_kept_only_when_they_cover_every_position(official):
    official.pad_embeddings = torch.randn(POSITIONS + 1, WIDTH)
    assert to_adaface_weights(official).pad_embeddings is None


def test_an_encoder_of_another_width_is_refused(official):
    encoder = ada.CLIPTextTransformer(ada.TextModelConfig(VOCAB, 16, 32, 1, 2, 22))
    with pytest.raises(ModelFileError, match="hidden_size 32 \\(the inverter's\\)"):
        to_adaface_weights(official, encoder)


def test_converter_refuses_to_overwrite_and_checks_the_dtype(tmp_path):
    out = tmp_path / "adaface.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        convert_official_adaface(str(tmp_path / "official.pt"), str(out))
    assert out.read_bytes() == b"precious"
    with pytest.raises(ConfigError, match="bfloat16 is not one of"):
        convert_official_adaface(str(tmp_path / "official.pt"), str(out), dtype=torch.bfloat16, overwrite=True)


def test_writing_float16_refuses_weights_beyond_its_range(official, tmp_path):
    official.state_dict["prompt2token_proj.text_model.encoder.layers.2.mlp.fc1.bias"][0] = 1e6
    weights = to_adaface_weights(official)
    with pytest.raises(ConfigError, match="layers.2.mlp.fc1.bias holds NaN or infinite values in torch.float16.*"
                                          "write the file in float32"):
        ada.save_adaface(weights, str(tmp_path / "half.safetensors"), torch.float16)
    assert not (tmp_path / "half.safetensors").exists()


def run_script(*args):
    return subprocess.run([sys.executable, "tools/convert_adaface.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@tokenizer_forms
def test_script_writes_a_loadable_file_and_never_overwrites_silently(tmp_path, with_ftfy):
    checkpoint, out = str(tmp_path / "official.pt"), tmp_path / "adaface.safetensors"
    save_official(checkpoint, arc2face_generator("ldm.modules", with_ftfy=with_ftfy))

    done = run_script("--inverter", checkpoint, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "K/V multipliers [2, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4]" in done.stdout
    assert "ID vectors: 16" in done.stdout and "Arc2Face ID encoder: not bundled" in done.stdout
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # the default dtype
    assert ada.load_adaface(str(out)).config.inverter.kv_multipliers == MULTIPLIERS
    written = out.read_bytes()

    refused = run_script("--inverter", checkpoint, "--out", str(out), "--dtype", "fp32")
    assert refused.returncode == 1 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert out.read_bytes() == written

    encoder = save_encoder(tiny_arc2face(), tmp_path / "encoder", "safetensors")
    done = run_script("--inverter", checkpoint, "--out", str(out), "--dtype", "fp32", "--overwrite",
                      "--arc2face_encoder", str(encoder))
    assert done.returncode == 0, done.stderr
    assert "Arc2Face ID encoder: bundled" in done.stdout
    loaded = ada.load_adaface(str(out))
    assert loaded.arc2face is not None and loaded.hidden_state_layer_weights.dtype == torch.float32


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
    start = time.thread_time()  # this thread's CPU time: other processes' load does not count
    with pytest.raises(ModelFileError, match="'num_hidden_layers' is 1000000000, expected an integer from 1 to 64"):
        load_arc2face_encoder(str(encoder_folder))
    assert time.thread_time() - start < 1


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
    with pytest.raises(ModelFileError, match="refused unread: the pickle names posix.system.*refused on purpose"):
        load_arc2face_encoder(str(encoder_folder))
    assert not marker.exists()

"""IDAdapter's recipe has one home (nodes/arch/idadapter.py), used by node and trainer alike; the pack raises its
own error classes, so the trainer's CLI can report them in one line without hiding real bugs."""

import os
import subprocess
import sys

import pytest
import torch

from comfyui_idadapter.nodes import errors
from comfyui_idadapter.nodes.arch import idadapter as ida
from comfyui_idadapter.nodes.arch.face_embeds import mean_identity_vector
from comfyui_idadapter.nodes.arch.unet_blocks import FAMILIES, family_of_unet
from idadapter_helpers import tiny_adapter
from tiny_face_models import make_pack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("caption,expected", [
    ("a photo of a woman", "a photo of a woman, woman is sks"),
    ("a photo of a woman,", "a photo of a woman, woman is sks"),  # the node used to strip this comma, the trainer not
    ("  a photo of a woman , ", "a photo of a woman, woman is sks"),
    ("", "woman is sks"),
])
def test_identity_prompt_is_the_papers_template(caption, expected):
    assert ida.identity_prompt(caption, " woman ", "sks") == expected


def test_trainer_prompt_is_the_recipes_and_tokenizes_as_its_tokenizers_do(tmp_path):
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training import tiny
    from comfyui_idadapter.training.prompts import PromptEncoder

    tokenizer = tiny.tiny_tokenizer(str(tmp_path / "tok"))
    encoder = PromptEncoder("sd15", [tokenizer], [None], "sks", 64)
    assert encoder.prompt("a photo of a woman,", "woman") == "a photo of a woman, woman is sks"
    (ids,) = encoder.tokenize([encoder.prompt("a photo of a woman,", "woman")])
    assert ids.shape == (1, 77) and int((ids[0] == encoder.identifier_ids[0]).sum()) == 1


@pytest.mark.parametrize("word", ["", "two words", " sks", "sks\n"])
def test_identifier_must_be_one_word(word):
    with pytest.raises(errors.ConfigError, match="one word"):
        ida.check_identifier(word)


def test_identifier_must_be_one_token():
    assert ida.identifier_token("sks", [48136], "l") == 48136
    with pytest.raises(errors.ConfigError, match="'zqxv' is 2 tokens for the 'g' text encoder"):
        ida.identifier_token("zqxv", [1, 2], "g")


def test_base_families_are_one_table():
    assert [family_of_unet(c, p) for c, p in ((768, False), (1024, False), (2048, True))] == ["sd15", "sd21", "sdxl"]
    with pytest.raises(errors.ConfigError, match="supports SD1.5 \\(768\\), SD2.x \\(1024\\) and SDXL"):
        family_of_unet(2048, False)
    assert tuple(FAMILIES["sdxl"]["text_dims"]) == ("l", "g")  # diffusers' text_encoder, text_encoder_2


def test_mean_identity_vector_is_the_unit_mean_of_unit_vectors():
    vectors = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    expected = torch.tensor([1.0, 1.0]) / 2**0.5
    torch.testing.assert_close(mean_identity_vector(vectors), expected)
    torch.testing.assert_close(mean_identity_vector(vectors[None].repeat(2, 1, 1)), expected.repeat(2, 1))


def test_fill_references_to_n():
    images = torch.rand(2, 3, 8, 8)
    plain = ida.fill_references(images, 5, seed=0, augment=False)
    assert torch.equal(plain, images[[0, 1, 0, 1, 0]])
    augmented = ida.fill_references(images, 5, seed=0)
    assert augmented.shape == (5, 3, 8, 8) and torch.equal(augmented[:2], images)
    assert torch.equal(augmented, ida.fill_references(images, 5, seed=0))  # seeded
    assert not torch.equal(augmented, ida.fill_references(images, 5, seed=1))
    many = torch.rand(6, 3, 8, 8)
    assert torch.equal(ida.fill_references(many, 4, seed=0), many[:4])
    assert torch.equal(ida.fill_references(many, 4, seed=0, augment=False), many[:4])


def test_embed_references_without_a_face_is_a_no_face_error():
    weights = tiny_adapter()
    cfg = weights.config
    with pytest.raises(errors.NoFaceError, match="no face was found in the references"):
        ida.embed_references(weights.adapter, torch.zeros(2, 5, cfg.clip_vision_dim), torch.zeros(2, cfg.clip_vision_dim),
                             torch.zeros(0, 512))
    with pytest.raises(errors.ModelFileError, match=r"expected ArcFace vectors \[faces, 512\], got \(1, 128\)"):
        ida.embed_references(weights.adapter, torch.zeros(2, 5, cfg.clip_vision_dim), torch.zeros(2, cfg.clip_vision_dim),
                             torch.zeros(1, 128))


def test_trainer_takes_any_folder_holding_the_pack(tmp_path):
    """--insightface_pack used to be split into (grandparent, name), which only worked under a folder named models."""
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training.idadapter_models import load_face_models

    make_pack(str(tmp_path / "somewhere"), "antelopev2")
    folder = tmp_path / "packs" / "antelopev2"
    folder.parent.mkdir()
    (tmp_path / "somewhere" / "models" / "antelopev2").rename(folder)
    analyzer, arcface = load_face_models(str(folder), provider="CPU")
    assert analyzer.pack_dir == str(folder) and arcface.num_features == 512
    with pytest.raises(errors.ModelFolderError, match=f"one folder too deep .* found them in {folder}"):
        load_face_models(str(folder.parent), provider="CPU")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.ModelFolderError, match="has no .onnx files"):
        load_face_models(str(tmp_path / "empty"), provider="CPU")
    with pytest.raises(errors.ModelFolderError, match="is not a folder"):
        load_face_models(str(tmp_path / "nowhere"), provider="CPU")


def test_cli_reports_pack_errors_in_one_line(tmp_path):
    script = os.path.join(REPO, "training", "train_idadapter.py")
    out = subprocess.run([sys.executable, script, "--preset", "tiny", "--resume", str(tmp_path), "--output_dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"--resume {str(tmp_path)!r} is not a checkpoint folder" in out.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was built


def test_cli_catches_only_the_packs_errors(capsys):
    """A plain ValueError is a bug: it must reach the user as a traceback, not as a one-line 'error:'. (Every trainer
    script's cli is ``cli.exit_code`` around its main.)"""
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training import cli

    def fail(error):
        def main(argv=None):
            raise error
        return main

    assert cli.exit_code(fail(errors.DatasetError("no usable identity in 'x'")), []) == 1
    assert capsys.readouterr().err == "error: no usable identity in 'x'\n"
    with pytest.raises(ValueError, match="a bug"):
        cli.exit_code(fail(ValueError("a bug")), [])

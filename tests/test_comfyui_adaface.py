"""AdaFace inside a real ComfyUI (COMFYUI_PATH): the nodes against the tiny checkpoint's CLIP."""

import os

import pytest

from test_comfyui import make_work_dir, needs_comfyui, run_check

pytestmark = needs_comfyui


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = make_work_dir(tmp_path_factory.mktemp("comfy_adaface") / "work")
    run_check(work, "make_sd15_assets", {})
    assert run_check(work, "make_adafaces", {}) == ["arc2face", "inverter_only.safetensors",
                                                    "tiny_adaface.safetensors"]
    return work


def test_encode_equals_the_prompt_with_the_identity_in_the_token_table(work):
    result = run_check(work, "adaface_conditioning_matches_reference", {})
    assert result["single_token_words"] and result["vectors_shape"] == [16, 768]
    assert result["arc2face_ids"] and result["template_ids"]  # the constant templates are CLIP's own ids
    assert result["vectors_vs_direct"] < 1e-6  # through the memory manager = the arch module run directly
    assert result["vectors_vs_table"] < 1e-3  # the table is fp16: the reference holds the vectors rounded, so the
    # conditionings agree to fp16 rounding (a misplaced or missing vector differs by ~1)
    for case, shape in (("present", [1, 77, 768]), ("absent", [1, 77, 768]), ("long", [1, 154, 768])):
        assert result[case]["shape"] == result[case]["reference_shape"] == shape, (case, result[case])
        assert result[case]["max_diff"] < 2e-3, (case, result[case])


def test_saved_embedding_works_through_comfyuis_embedding_syntax(work):
    result = run_check(work, "saved_embedding_matches_encode", {})
    assert result["word"] == "embedding:tiny_person"
    assert result["loaded_shape"] == [16, 768] and result["loaded_diff"] == 0.0
    assert result["cond_diff"] < 1e-5 and result["changed_vs_plain"] > 1e-3
    assert result["two_people_diff"] < 1e-5  # z and y: each face's 16 tokens where its word is
    assert "exists: choose another name or turn on overwrite" in result["second_save"]
    umask = os.umask(0)
    os.umask(umask)
    assert result["mode"] == oct(0o666 & ~umask)  # readable as the umask says, like ComfyUI's own files


def test_arc2face_encoder_folder_is_offered_and_used(work):
    result = run_check(work, "adaface_encoder_folder", {})
    assert result["inverters"] == ["inverter_only.safetensors", "tiny_adaface.safetensors"]  # not the encoder's
    assert result["encoders"] == ["(bundled in the inverter file)", "arc2face/encoder"]
    assert result["max_diff"] == 0.0


def test_other_clip_families_are_refused_naming_both(work):
    result = run_check(work, "adaface_refuses_other_families", {})
    for family in ("sd21", "sdxl"):
        assert result[family].startswith("PackError: this AdaFace writes sd15 prompt tokens"), result
        assert f"the CLIP belongs to {family}" in result[family], result


def test_trainer_export_gives_the_trainers_tokens_in_load_adaface(work, tmp_path):
    """The tiny trainer's export in models/adaface/: the nodes' tokens are the trainer's (1e-5)."""
    pytest.importorskip("diffusers")
    import shutil

    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from comfyui_idadapter.nodes.arch import adaface as ada
    from comfyui_idadapter.training import loop
    from comfyui_idadapter.training.adaface_config import AdaFaceTrainConfig
    from comfyui_idadapter.training.adaface_task import AdaFaceTask
    from comfyui_idadapter.training.cli import parse_args

    config = parse_args(AdaFaceTrainConfig, ["--preset", "tiny", "--output_dir", str(tmp_path), "--report_to", "none",
                                             "--validation_every", "0"])
    task = AdaFaceTask(config, log=lambda *args: None)
    export = loop.run(task, config)
    shutil.copy(export, work / "models" / "adaface" / "trained.safetensors")
    faces = F.normalize(torch.randn(2, ada.ARCFACE_DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        context = ada.arc2face_context(task.m.arc2face, faces)
        tokens = task.trainable(context[:, ada.ID_START:ada.ID_START + ada.NUM_ID_VECS])
    save_file({"faces": faces.contiguous(), "tokens": tokens.contiguous()}, str(tmp_path / "expected.safetensors"))
    result = run_check(work, "adaface_tokens_of_file", {"file": "trained.safetensors",
                                                         "expected": str(tmp_path / "expected.safetensors")})
    assert result["multipliers"] == [2, 2]
    assert max(result["diffs"]) < 1e-5, result

"""training/evaluate_idadapter.py: the paper's metrics on hand-made faces (ID-Sim, the five-landmark head pose,
Pose-Div, the face-detection rate), the faces of real images through the tiny detector, the options' checks, and one
end-to-end --preset tiny run."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_idadapter.nodes.arch import face_metrics as fm
from comfyui_idadapter.nodes.arch import idadapter as ida
from comfyui_idadapter.nodes.arch.face_embeds import FaceEmbeds
from comfyui_idadapter.nodes.arch.iresnet import ARCFACE_TEMPLATE_112
from comfyui_idadapter.nodes.errors import ConfigError, DatasetError
from comfyui_idadapter.training.cli import parse_args
from comfyui_idadapter.training.idadapter_config import IDAdapterEvalConfig
from idadapter_helpers import tiny_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- hand-made faces


def model_face(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0, scale: float = 80.0, shift=(0.0, 0.0)):
    """Five landmarks [5, 2] of a face of the estimator's proportions (eyes 1 apart, the frontal nose height and
    eye-to-mouth height, the nose NOSE_DEPTH in front), turned by yaw then pitch (degrees), seen without perspective,
    then rotated in the image plane by roll, scaled and shifted."""
    height, nose = fm.FRONTAL_EYE_TO_MOUTH, fm.FRONTAL_NOSE_HEIGHT
    points = torch.tensor([[-0.5, 0, 0], [0.5, 0, 0], [0, nose * height, fm.NOSE_DEPTH], [-0.4, height, 0],
                           [0.4, height, 0]], dtype=torch.float64)
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    turn = torch.tensor([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]], dtype=torch.float64)
    # image y points down and z towards the camera: turning up lifts the nose (smaller y)
    tilt = torch.tensor([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]], dtype=torch.float64)
    flat = (points @ (tilt @ turn).T)[:, :2]
    in_plane = torch.tensor([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]], dtype=torch.float64)
    return (flat @ in_plane.T * scale + torch.tensor(shift, dtype=torch.float64)).float()


def unit(*values):
    return torch.nn.functional.normalize(torch.tensor(values, dtype=torch.float32), dim=-1)


def faces(embeddings, landmarks, image_index):
    count = len(image_index)
    return FaceEmbeds(torch.stack(embeddings), torch.zeros(count, 4), torch.stack(landmarks), torch.ones(count),
                      torch.tensor(image_index, dtype=torch.long))


def test_id_sim_is_one_for_the_same_face_and_zero_for_an_orthogonal_one():
    references = torch.stack([unit(1, 0, 0, 0)])
    generated = torch.stack([unit(1, 0, 0, 0), unit(0, 1, 0, 0), unit(1, 1, 0, 0)])
    torch.testing.assert_close(fm.identity_similarity(generated, references), torch.tensor([1.0, 0.0, 2 ** -0.5]))


def test_id_sim_compares_with_the_references_unit_mean_vector():
    references = torch.stack([unit(1, 0, 0), unit(0, 1, 0)])  # the mean direction is (1, 1, 0) / sqrt 2
    generated = torch.stack([unit(1, 1, 0), unit(0, 0, 1), unit(1, 0, 0)])
    torch.testing.assert_close(fm.identity_similarity(generated, references), torch.tensor([1.0, 0.0, 2 ** -0.5]))


def test_the_frontal_template_has_no_yaw_and_no_pitch():
    torch.testing.assert_close(fm.head_pose(torch.tensor(ARCFACE_TEMPLATE_112)), torch.zeros(2), atol=1e-3, rtol=0)


@pytest.mark.parametrize("yaw,pitch", [(0, 0), (15, 0), (-40, 0), (60, 0), (0, 10), (0, -25), (0, 35)])
@pytest.mark.parametrize("roll,scale,shift", [(0, 80, (0, 0)), (23, 31, (200, -40)), (-70, 250, (-3, 900))])
def test_a_face_turned_about_one_axis_gives_its_angle_wherever_it_is_in_the_image(yaw, pitch, roll, scale, shift):
    pose = fm.head_pose(model_face(yaw, pitch, roll, scale, shift))
    torch.testing.assert_close(pose, torch.tensor([yaw, pitch], dtype=torch.float32), atol=1e-3, rtol=0)


def test_turns_about_both_axes_keep_the_yaw_and_come_close_in_pitch():
    yaw, pitch = fm.head_pose(model_face(30, 15)).tolist()
    assert yaw == pytest.approx(30, abs=1e-3) and pitch == pytest.approx(17.19, abs=0.01)  # the documented example


def test_pose_deviation_is_the_mean_absolute_difference_over_every_generated_reference_pair():
    generated = torch.tensor([[10.0, 0.0], [-20.0, 5.0], [30.0, -5.0]])
    torch.testing.assert_close(fm.pose_deviation(generated, torch.tensor([[0.0, 0.0]])), torch.tensor([20.0, 10 / 3]))
    two = torch.tensor([[0.0, 0.0], [10.0, 5.0]])  # yaw: 10 + 0 + 20 + 30 + 30 + 20 over 6 pairs
    torch.testing.assert_close(fm.pose_deviation(generated, two), torch.tensor([110 / 6, 25 / 6]))


def test_paper_metrics_count_images_without_a_face_and_leave_them_out_of_the_means():
    reference = unit(1, 0, 0)
    found = faces([unit(1, 0, 0), unit(0, 1, 0), unit(1, 1, 0)],
                  [model_face(20), model_face(-10, 0, 30, 40, (50, 50)), model_face(0, 12)], [0, 1, 3])
    m = fm.paper_metrics(found, 4, reference[None], model_face()[None])
    assert (m["images"], m["faces"], m["face_detection_rate"]) == (4, 3, 0.75)
    assert m["id_sim"] == pytest.approx((1 + 0 + 2 ** -0.5) / 3, abs=1e-6)
    assert m["id_sim_all_images"] == pytest.approx((1 + 0 + 2 ** -0.5) / 4, abs=1e-6)  # the face-less image as 0
    assert m["pose_div_yaw"] == pytest.approx(10, abs=1e-3) and m["pose_div_pitch"] == pytest.approx(4, abs=1e-3)
    assert m["per_image"][2] is None
    assert m["per_image"][0] == pytest.approx((1.0, 20.0, 0.0), abs=1e-3)
    assert m["reference_poses"] == [pytest.approx([0.0, 0.0], abs=1e-3)]


def test_paper_metrics_without_any_face():
    none = FaceEmbeds(torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 5, 2), torch.zeros(0),
                      torch.zeros(0, dtype=torch.long))
    m = fm.paper_metrics(none, 2, unit(1, 0, 0)[None], model_face()[None])
    assert (m["face_detection_rate"], m["id_sim"], m["id_sim_all_images"]) == (0.0, None, 0.0)
    assert (m["pose_div_yaw"], m["pose_div_pitch"], m["per_image"]) == (None, None, [None, None])


def test_paper_metrics_refuse_two_faces_for_one_image():
    two = faces([unit(1, 0), unit(0, 1)], [model_face(), model_face()], [0, 0])
    with pytest.raises(ValueError, match="at most one face per image"):
        fm.paper_metrics(two, 2, unit(1, 0)[None], model_face()[None])


# ---- real images through the tiny detector


def save(pixels: np.ndarray, path) -> None:
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)


def test_generated_images_without_a_face_count_against_the_detection_rate(analyzer, tmp_path):
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training import idadapter_eval, tiny

    face = tiny.synthetic_image(0, (1, 2), 64, seed=3)
    save(face, tmp_path / "a.png")
    save(np.zeros((64, 64, 3)), tmp_path / "dark.png")  # too dark for the tiny detector: no face
    references, skipped = idadapter_eval.load_references(str(tmp_path), analyzer)
    assert [os.path.basename(r.path) for r in references] == ["a.png"] and skipped == {"no face detected": ["dark.png"]}
    pixels = idadapter_eval.image_batch([Image.open(tmp_path / "dark.png"), Image.open(tmp_path / "a.png")])
    m = idadapter_eval.measure_faces(analyzer, pixels, references)
    assert (m["images"], m["faces"], m["face_detection_rate"]) == (2, 1, 0.5)
    assert m["per_image"][0] is None
    assert m["id_sim"] == pytest.approx(1.0, abs=1e-5)  # the reference photo itself
    assert m["id_sim_all_images"] == pytest.approx(0.5, abs=1e-5)
    assert m["pose_div_yaw"] == pytest.approx(0.0, abs=1e-3)


def test_references_without_any_face_are_an_error_naming_the_files(analyzer, tmp_path):
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training import idadapter_eval

    save(np.zeros((64, 64, 3)), tmp_path / "dark.png")
    with pytest.raises(DatasetError, match="no photo with a detectable face .no face detected: dark.png"):
        idadapter_eval.load_references(str(tmp_path), analyzer)


def test_kv_deltas_are_added_at_the_weight():
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training import diffusers_binding, tiny

    unet = tiny.tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    deltas = {"middle_0_0": {"to_k": torch.ones(64, 768), "to_v": torch.full((64, 768), 2.0)}}
    diffusers_binding.add_kv_deltas(unet, deltas, 0.5)
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.{}.weight"
    assert changed == {key.format("to_k"), key.format("to_v")}
    torch.testing.assert_close(unet.state_dict()[key.format("to_v")], before[key.format("to_v")] + 1.0)


def test_clip_t_reads_the_identifier_as_the_class_noun():
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training.idadapter_eval import clip_text

    assert clip_text("a photo of sks, smiling; sksx", "sks", "woman") == "a photo of woman, smiling; sksx"


# ---- options


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of sks\n\n  a photo of sks, smiling  \n")
    return str(path)


BAD_OPTIONS = [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--resolution", "100"], "--resolution must be a multiple of 8 and at least 32, got 100"),
    (["--guidance_scale", "-1"], "--guidance_scale must be 0 or more"),
    (["--weight", "nan"], "--weight must be a finite number"),
    (["--num_images", "300"], "--num_images must be 0 (the adapter's N) to 256, got 300"),
    (["--seeds", "1", "-2"], "--seeds must be one or more seeds in [0, 2**32)"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--identifier", "two words"], "--identifier: the identifier must be one word"),
    (["--class_noun", "x1"], "--class_noun must be a word of letters"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:<n> or mps, got 'tpu'"),
    (["--mixed_precision", "fp8"], "--mixed_precision must be no, fp16 or bf16"),
    (["--preset", "huge"], "--preset must be 'tiny' or absent"),
    (["--adapter", "/nonexistent.safetensors"], "--adapter '/nonexistent.safetensors' does not exist"),
    (["--clip_model", "/nonexistent"], "--clip_model '/nonexistent' does not exist"),
    (["--references", __file__], "--references " + repr(__file__) + " is not a folder"),
    (["--adapter", REPO], "--adapter " + repr(REPO) + " is not a file"),
    (["--output_dir", __file__], "is a file, not a folder"),
]


@pytest.mark.parametrize("args,fragment", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_a_config_error(args, fragment):
    with pytest.raises(ConfigError) as info:
        parse_args(IDAdapterEvalConfig, ["--preset", "tiny", *args])
    assert fragment in str(info.value) and str(info.value).startswith("invalid evaluation configuration:")


def test_prompt_files_must_hold_prompts(tmp_path, prompt_file):
    from comfyui_idadapter.training.idadapter_config import read_prompts

    assert read_prompts(prompt_file) == ["a photo of sks", "a photo of sks, smiling"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, fragment in (("empty.txt", "has no prompt"), ("latin1.txt", "cannot be read as UTF-8")):
        with pytest.raises(ConfigError, match=fragment):
            parse_args(IDAdapterEvalConfig, ["--preset", "tiny", "--prompts", str(tmp_path / name)])


def test_without_the_preset_every_input_is_required_and_all_problems_come_in_one_message():
    with pytest.raises(ConfigError) as info:
        parse_args(IDAdapterEvalConfig, ["--steps", "0"])
    message = str(info.value)
    for name in ("adapter", "base_model", "clip_vision", "insightface_pack", "references", "prompts"):
        assert f"--{name} is required (or use --preset tiny)" in message
    assert message.count("\n  --") == 7  # six inputs and --steps


def test_cli_reports_a_bad_option_with_exit_code_1_and_no_traceback():
    out = subprocess.run([sys.executable, os.path.join(REPO, "training", "evaluate_idadapter.py"), "--preset", "tiny",
                          "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: invalid evaluation configuration:")
    assert "--steps must be at least 1" in out.stderr


# ---- end to end


@pytest.fixture
def eval_dir(tmp_path, tiny_assets):
    out = tmp_path / "eval"
    out.mkdir()
    shutil.copytree(tiny_assets, out / "tiny_assets")  # the tiny trainer's models: no base pretraining here
    return out


def test_tiny_preset_writes_every_metric_the_table_and_the_images(eval_dir, prompt_file, capsys):
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training import evaluate_idadapter, idadapter_eval

    adapter = str(eval_dir / "adapter.safetensors")
    ida.save_idadapter(tiny_adapter(gamma=0.5), adapter)
    report = evaluate_idadapter.main(["--preset", "tiny", "--output_dir", str(eval_dir), "--adapter", adapter,
                                      "--prompts", prompt_file, "--seeds", "7", "--steps", "2"])
    saved = json.loads((eval_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(idadapter_eval.METRICS) <= set(saved)
    assert saved["counts"] == {"images": 2, "faces": round(2 * saved["face_detection_rate"]), "references": 2}
    assert [(g["prompt"], g["seed"]) for g in saved["generated"]] == [("a photo of sks", 7),
                                                                     ("a photo of sks, smiling", 7)]
    for entry in saved["generated"]:
        with Image.open(eval_dir / entry["file"]) as image:
            assert image.size == (64, 64)
        assert (entry["id_sim"] is None) == (not entry["face"]) and -1 <= entry["clip_t"] <= 1
    assert saved["clip_t"] == pytest.approx(np.mean([g["clip_t"] for g in saved["generated"]]))
    assert saved["settings"]["num_images"] == 4 and saved["settings"]["adapter"] == adapter
    assert len(saved["references"]) == 2 and saved["references_skipped"] == {}
    table = (eval_dir / "metrics.md").read_text()
    assert "| method | ID-Sim ↑ | Pose-Div pitch ↑ | Pose-Div yaw ↑ | CLIP-T ↑ | faces found |" in table
    assert "| adapter.safetensors (N = 4) | " in table and "2 prompt(s) x 1 seed(s) = 2 images at 64 px" in table
    assert "metrics.md" in capsys.readouterr().out


def test_unusable_inputs_end_the_run_with_one_line_and_exit_code_1(eval_dir, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training import evaluate_idadapter

    dark = tmp_path / "dark"
    dark.mkdir()
    save(np.zeros((64, 64, 3)), dark / "dark.png")
    sd21 = str(tmp_path / "sd21.safetensors")
    ida.save_idadapter(tiny_adapter("sd21"), sd21)
    for args, fragment in (
            (["--references", str(dark)], "has no photo with a detectable face (no face detected: dark.png)"),
            (["--adapter", sd21], "trained for sd21 (context 1024); the base model is sd15 (context 768)"),
    ):
        code = evaluate_idadapter.cli(["--preset", "tiny", "--output_dir", str(eval_dir), "--steps", "1", *args])
        error = capsys.readouterr().err
        assert code == 1 and error.startswith("error: ") and error.count("\n") == 1 and fragment in error

"""The pack inside ComfyUI: imports without it, registers its nodes and runs graphs with it.

Tests that need ComfyUI run it from COMFYUI_PATH (a checkout) in a subprocess, with COMFYUI_PYTHON (default:
this interpreter), and are skipped when COMFYUI_PATH is not set.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from comfyui_idadapter.nodes.arch.face_embeds import load_face_embeds
from comfyui_idadapter.nodes.arch.files import file_fingerprint
from declared_nodes import declared_nodes
from tiny_face_models import expected_box, face_image, make_pack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
needs_comfyui = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set (point it at a ComfyUI checkout to run this test)"
)


def test_pack_modules_import_without_comfyui_or_insightface():
    code = (
        "import sys\n"
        "sys.modules['insightface'] = None; sys.modules['onnxruntime'] = None\n"
        "sys.path.insert(0, 'tests')\n"
        "import pack_import\n"
        "pack = sys.modules['comfyui_idadapter']\n"
        "import comfyui_idadapter.nodes.arch.iresnet, comfyui_idadapter.nodes.arch.face_embeds\n"
        "import comfyui_idadapter.nodes.face.insightface_backend, comfyui_idadapter.nodes.face.images\n"
        "assert not hasattr(pack, 'comfy_entrypoint')\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('nodes', 'comfy', 'comfy_api', 'folder_paths', 'diffusers'))\n"
        "assert not leaked, leaked\n"
        "from comfyui_idadapter.nodes.face import insightface_backend as b\n"
        "try:\n"
        "    b.import_insightface()\n"
        "except b.MissingDependencyError as e:\n"
        "    print('ERROR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR: the face nodes need insightface and onnxruntime" in out.stdout
    assert "pip install insightface onnxruntime" in out.stdout


def with_mask_batch(prompt, apply_node, latent_node, masks, images):
    """``prompt`` with a white attn_mask batch of ``masks`` (Empty Image -> Convert Image to Mask) on ``apply_node``
    and a latent batch of ``images`` from ``latent_node`` (an Empty Latent Image)."""
    prompt = json.loads(json.dumps(prompt))
    prompt["40"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": masks,
                                                           "color": 0xFFFFFF}}
    prompt["41"] = {"class_type": "ImageToMask", "inputs": {"image": ["40", 0], "channel": "red"}}
    prompt[apply_node]["inputs"]["attn_mask"] = ["41", 0]
    prompt[latent_node]["inputs"]["batch_size"] = images
    return prompt


def _assert_mask_batch_refused(run, masks, images):
    """A run that stopped at sampling with the pack's error naming both batch sizes."""
    assert run["valid"] and run["success"] is False, run
    (error,) = run["errors"]
    assert error["exception_type"].endswith("ImageInputError"), error
    assert (f"attn_mask is a batch of {masks} masks and the latent batch has {images} images: give one mask for all "
            "images, or one per image") in error["exception_message"], error


def check_mask_batch_rule(work, graph, apply_node, latent_node):
    """Runs ``graph(prefix=...)`` with 2 masks for 3 latents, 3 for 2, 2 for 2 and 1 for 3: the first two stop at
    sampling with the pack's error, the others sample (their outputs are saved as masks2_2 and masks1_3)."""
    runs = [with_mask_batch(graph(prefix=f"masks{m}_{n}"), apply_node, latent_node, m, n)
            for m, n in ((2, 3), (3, 2), (2, 2), (1, 3))]
    two_for_three, three_for_two, per_image, one_for_all = run_check(work, "run_prompts", runs)["runs"]
    _assert_mask_batch_refused(two_for_three, 2, 3)
    _assert_mask_batch_refused(three_for_two, 3, 2)
    assert per_image["success"] and one_for_all["success"], (per_image, one_for_all)


def make_work_dir(work):
    """A ComfyUI base folder: the pack linked into custom_nodes/, a tiny insightface pack, input photos (one face,
    none, two people)."""
    (work / "custom_nodes").mkdir(parents=True)
    (work / "input").mkdir()
    (work / "output").mkdir()
    os.symlink(REPO, work / "custom_nodes" / "comfyui-idadapter")
    make_pack(str(work / "models" / "insightface"), "tinypack")
    for name, cells in (("face.png", [(1, 2)]), ("empty.png", []), ("two_people.png", [(1, 0), (2, 3)])):
        pixels = (face_image(cells, size=256)[0].numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels).save(work / "input" / name)
    return work


def run_check(work, check, payload):
    """Runs ``comfyui_checks.<check>(work, payload)`` inside a ComfyUI process and returns its result."""
    payload_file, result_file = work / f"{check}.payload.json", work / f"{check}.result.json"
    payload_file.write_text(json.dumps(payload))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    runner = os.path.join(REPO, "tests", "comfyui_runner.py")
    args = [python, runner, COMFYUI_PATH, str(work), check, str(payload_file), str(result_file)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads(result_file.read_text())


def _run_comfyui(tmp_path, prompts):
    work = make_work_dir(tmp_path / "comfy_work")
    return run_check(work, "run_prompts", prompts), work


def _embed_prompt(image):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "IDA_LoadInsightFace", "inputs": {"pack": "tinypack", "provider": "CPU", "det_size": 640}},
        "3": {"class_type": "IDA_FaceEmbed", "inputs": {"insightface": ["2", 0], "image": ["1", 0],
              "face_selection": "largest", "face_index": 0, "on_no_face": "error"}},
        "4": {"class_type": "IDA_SaveFaceEmbeds", "inputs": {"face_embeds": ["3", 0], "filename_prefix": "face_embeds/me"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }


@needs_comfyui
def test_nodes_register_and_face_graph_runs_in_comfyui(tmp_path):
    reload_prompt = {
        "1": {"class_type": "IDA_LoadFaceEmbeds", "inputs": {"file": "me_00001_.safetensors"}},
        "2": {"class_type": "IDA_FaceEmbedsCombine", "inputs": {"embeds_1": ["1", 0], "mode": "norm-mean"}},
        "3": {"class_type": "IDA_SaveFaceEmbeds", "inputs": {"face_embeds": ["2", 0], "filename_prefix": "face_embeds/avg"}},
    }
    result, work = _run_comfyui(tmp_path, [_embed_prompt("empty.png"), _embed_prompt("face.png"), reload_prompt])
    assert result["registered"] == sorted(declared_nodes())
    assert str(work / "models" / "insightface") in result["folders"]["insightface"]
    assert str(work / "models" / "idadapter") in result["folders"]["idadapter"]

    no_face, good, reloaded = result["runs"]
    # a photo without a face fails that run with our message, and the process goes on
    assert no_face["valid"] and no_face["success"] is False
    assert "no face" in json.dumps(no_face["errors"]) and "on_no_face" in json.dumps(no_face["errors"])
    assert good["success"] is True, good
    assert good["outputs"]["5"]["images"]  # the aligned crop was previewed
    saved = load_face_embeds(str(work / "output" / "face_embeds" / "me_00001_.safetensors"))
    assert len(saved) == 1
    recognizer = work / "models" / "insightface" / "models" / "tinypack" / "rec.onnx"
    assert saved.recognizer == file_fingerprint(str(recognizer))  # which ArcFace made the vectors
    torch.testing.assert_close(saved.boxes[0], torch.from_numpy(expected_box((1, 2), 256)), atol=1.0, rtol=0)
    assert saved.image_sizes == ((256, 256),)  # the photo the boxes belong to, for the encode nodes' check
    assert reloaded["success"] is True, reloaded
    averaged = load_face_embeds(str(work / "output" / "face_embeds" / "avg_00001_.safetensors"))
    torch.testing.assert_close(averaged.embeds, saved.embeds)  # norm-mean of one unit vector is itself
    assert averaged.recognizer == saved.recognizer  # through Load, Combine and Save


@needs_comfyui
def test_save_face_embeds_into_a_folder_keeps_every_save(tmp_path):
    twice = _embed_prompt("face.png")
    twice["4"]["inputs"]["filename_prefix"] = "people/anna/"
    # the second save's input differs, or ComfyUI's cache would stand in for running it
    twice["6"] = {"class_type": "IDA_FaceEmbedsCombine", "inputs": {"embeds_1": ["3", 0], "mode": "mean"}}
    twice["7"] = {"class_type": "IDA_SaveFaceEmbeds", "inputs": {"face_embeds": ["6", 0],
                                                                 "filename_prefix": "people/anna/"}}
    empty = _embed_prompt("face.png")
    empty["4"]["inputs"]["filename_prefix"] = ""
    result, work = _run_comfyui(tmp_path, [twice, empty])
    saved, refused = result["runs"]
    assert saved["success"] is True, saved
    folder = work / "output" / "people" / "anna"
    assert sorted(os.listdir(folder)) == ["face_00001_.safetensors", "face_00002_.safetensors"]
    for name in os.listdir(folder):
        assert len(load_face_embeds(str(folder / name))) == 1
    assert refused["success"] is False
    assert "filename_prefix is empty: expected a name such as 'face'" in json.dumps(refused["errors"])
    assert not [name for name in os.listdir(work / "output") if name.startswith(".")]


@needs_comfyui
def test_unavailable_provider_is_reported_on_the_node(tmp_path):
    prompt = _embed_prompt("face.png")
    prompt["2"]["inputs"]["provider"] = "CUDA"
    result, _ = _run_comfyui(tmp_path, [prompt])
    run = result["runs"][0]
    assert run["success"] is False
    assert "onnxruntime-gpu" in json.dumps(run["errors"])

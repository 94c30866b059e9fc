"""The W+ adapter inside a real ComfyUI (COMFYUI_PATH): W+ Encode -> (W+ Edit) -> Apply W+ Adapter -> KSampler on
the tiny SD1.5-shaped checkpoint, and how its attn2 replace patch sits among other packs'."""

import pytest
import torch
from safetensors.torch import load_file

from test_comfyui import check_mask_batch_rule, make_work_dir, needs_comfyui, run_check

pytestmark = needs_comfyui


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = make_work_dir(tmp_path_factory.mktemp("comfy_wplus") / "work")
    run_check(work, "make_sd15_assets", {})
    assert run_check(work, "make_wplus_assets", {}) == ["input_1_0", "input_3_0", "middle_0_0", "output_0_0",
                                                         "output_1_0", "output_2_0", "output_3_0"]
    return work


def graph(scale=1.0, patched=True, edit=None, batch=1, prefix="run"):
    wplus = ["5", 0]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "3": {"class_type": "IDA_LoadInsightFace", "inputs": {"pack": "tinypack", "provider": "CPU", "det_size": 640}},
        "4": {"class_type": "IDA_LoadE4EEncoder", "inputs": {"file": "tiny_e4e.safetensors"}},
        "5": {"class_type": "IDA_WPlusEncode", "inputs": {"e4e": ["4", 0], "image": ["2", 0], "insightface": ["3", 0]}},
        "6": {"class_type": "IDA_LoadWPlusAdapter", "inputs": {"file": "tiny_wplus.safetensors"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a face"}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["7", 0] if patched else ["1", 0], "seed": 0, "steps": 3,
               "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["8", 0], "negative": ["9", 0],
               "latent_image": ["10", 0], "denoise": 1.0}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if edit is not None:
        prompt["13"] = {"class_type": "IDA_WPlusEdit", "inputs": {
            "wplus": ["5", 0], "direction": edit, "strength": 2.0, "sweep": "-2, 2", "start_layer": -1,
            "end_layer": -1, "ganspace_component": 0, "ganspace_mode": "target (official)"}}
        wplus = ["13", 0]
    prompt["7"] = {"class_type": "IDA_ApplyWPlusAdapter", "inputs": {
        "model": ["1", 0], "wplus_adapter": ["6", 0], "wplus": wplus, "scale": scale, "start_percent": 0.0,
        "end_percent": 1.0}}
    return prompt


def latent(work, prefix):
    (path,) = (work / "output" / "latents").glob(f"{prefix}_[0-9]*.latent")
    return load_file(str(path))["latent_tensor"]


def test_the_graph_samples_with_the_adapter_and_scale_zero_is_the_plain_model(work):
    runs = [graph(patched=False, prefix="base"), graph(scale=1.0, prefix="s1"), graph(scale=0.0, prefix="s0"),
            graph(edit="directions/age.pt", batch=2, prefix="sweep"),
            graph(edit="directions/smile.npy", batch=2, prefix="sweep_npy")]
    result = run_check(work, "run_prompts", runs)
    for run in result["runs"]:
        assert run["valid"] and run["success"], run
    base = latent(work, "base")
    assert (latent(work, "s1") - base).abs().max() > 1e-3  # the residual cross-attention changes the image
    assert torch.equal(latent(work, "s0"), base)  # scale 0: exactly the unpatched model
    sweep = latent(work, "sweep")
    assert sweep.shape[0] == 2 and (sweep[0] - sweep[1]).abs().max() > 1e-4  # one latent per edit strength
    assert latent(work, "sweep_npy").shape[0] == 2


def test_attn_mask_batch_is_one_for_all_latents_or_one_per_latent(work):
    """A mask batch of 2 with a latent batch of 3 (and 3 with 2) stops at sampling with the pack's error; 2 masks for 2
    latents and 1 mask for 3 sample."""
    check_mask_batch_rule(work, graph, "7", "10")
    assert latent(work, "masks2_2").shape[0] == 2 and latent(work, "masks1_3").shape[0] == 3


def test_the_patch_chains_to_another_packs_and_leaves_it_alone(work):
    result = run_check(work, "wplus_patch_wiring", {})
    assert result["ours"] == ["input_1_0", "input_3_0", "middle_0_0", "output_0_0", "output_1_0", "output_2_0",
                              "output_3_0"]
    assert result["chained"] and result["others_unchained"]
    assert result["input_model_keeps_its_own"] and result["patcher_in_models"]
    assert result["scale_zero_patches"] == 0


def test_named_ganspace_edit_and_workflows_saved_before_it(tmp_path):
    result = run_check(make_work_dir(tmp_path / "work"), "wplus_named_ganspace_edit", {})
    assert result["named_rows"] == [4] and result["named_is_official"]  # big_smile: component 19, row 4, target 20
    assert result["saved_before_rows"] == list(range(18)) and result["saved_before_unchanged"]
    # saved workflows hold widget values by position: the inputs they have keep their order, the new one comes last
    assert result["required"] == ["wplus", "direction", "strength", "sweep", "start_layer", "end_layer",
                                  "ganspace_component", "ganspace_mode"]
    kind, options = result["optional"]["ganspace_edit"]
    assert kind == "COMBO" and options["default"] == "custom"
    assert options["options"][0] == "custom" and "big_smile" in options["options"]

"""IDAdapter inside a real ComfyUI (COMFYUI_PATH): a tiny SD1.5-shaped checkpoint made here, sampled with
KSampler through the example graph's nodes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from test_comfyui import check_mask_batch_rule, make_work_dir, needs_comfyui, run_check

pytestmark = needs_comfyui


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = make_work_dir(tmp_path_factory.mktemp("comfy") / "work")
    run_check(work, "make_sd15_assets", {})
    info = run_check(work, "make_idadapters", {})
    assert info["model_config"] == "SD15", info  # ComfyUI detects the tiny checkpoint as SD1.5
    assert info["blocks"] == ["input_1_0", "input_3_0", "middle_0_0", "output_0_0", "output_1_0", "output_2_0",
                              "output_3_0"]
    return work


def graph(adapter="tiny.safetensors", weight=1.0, patched=True, prefix="run"):
    """The example workflow's graph in API format, ending in SaveLatent (and SaveImage) so runs compare."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vit_l.safetensors"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "4": {"class_type": "IDA_LoadInsightFace", "inputs": {"pack": "tinypack", "provider": "CPU", "det_size": 640}},
        "5": {"class_type": "IDA_FaceEmbed", "inputs": {"insightface": ["4", 0], "image": ["3", 0],
              "face_selection": "largest", "face_index": 0, "on_no_face": "error"}},
        "6": {"class_type": "IDA_LoadIDAdapter", "inputs": {"file": adapter}},
        "7": {"class_type": "IDA_IDAdapterMFFEmbed", "inputs": {"idadapter": ["6", 0], "clip_vision": ["2", 0],
              "images": ["3", 0], "num_images": 0, "augment": True, "seed": 0, "face_embeds": ["5", 0]}},
        "8": {"class_type": "IDA_ApplyIDAdapter", "inputs": {"model": ["1", 0], "idadapter": ["6", 0],
              "embeds": ["7", 0], "weight": weight, "start_percent": 0.0, "end_percent": 1.0}},
        "9": {"class_type": "IDA_IDAdapterTextEncode", "inputs": {"clip": ["1", 1], "embeds": ["7", 0],
              "text": "a photo of sks", "identifier": "sks", "class_noun": "person", "append_class_phrase": True}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["8", 0] if patched else ["1", 0], "seed": 0, "steps": 3,
               "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["9", 0],
               "negative": ["10", 0], "latent_image": ["11", 0], "denoise": 1.0}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": f"latents/{prefix}"}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": prefix}},
    }


def latent(work, prefix):
    (path,) = (work / "output" / "latents").glob(f"{prefix}_[0-9]*.latent")
    return load_file(str(path))["latent_tensor"]


def test_example_graph_samples_with_the_adapter(work):
    runs = [graph(patched=False, prefix="base"), graph(weight=1.0, prefix="w1"), graph(weight=0.0, prefix="w0"),
            graph(adapter="untrained.safetensors", prefix="gamma0"), graph(patched=False, prefix="base_again"),
            graph(adapter="buffalo.safetensors", prefix="other_recognizer")]
    result = run_check(work, "run_prompts", runs)
    *sampled, other_recognizer = result["runs"]
    for run in sampled:
        assert run["valid"] and run["success"], run
    # an adapter trained on buffalo_l's ArcFace refuses the tiny pack's face embeds, saying which pack to load
    assert other_recognizer["valid"] and other_recognizer["success"] is False
    assert "pick the buffalo_l pack (its recognizer is w600k_r50.onnx)" in json.dumps(other_recognizer["errors"])
    base = latent(work, "base")
    assert torch.isfinite(base).all()
    assert (latent(work, "w1") - base).abs().max() > 1e-3  # gamma != 0 and K/V deltas: the image changes
    assert torch.equal(latent(work, "w0"), base)  # weight 0: exactly the unpatched model
    assert torch.equal(latent(work, "gamma0"), base)  # an untrained adapter (gamma = 0, no deltas) is the identity
    assert torch.equal(latent(work, "base_again"), base)  # the patched branch left the base model untouched
    assert list((work / "output").glob("w1_*.png"))


def test_attn_mask_batch_is_one_for_all_images_or_one_per_image(work):
    """A mask batch of 2 with a latent batch of 3 (and 3 with 2) stops at sampling with the pack's error; 2 masks for 2
    images and 1 mask for 3 sample."""
    check_mask_batch_rule(work, graph, "8", "11")
    assert latent(work, "masks2_2").shape[0] == 2 and latent(work, "masks1_3").shape[0] == 3


def test_attn_mask_values_are_checked_when_the_apply_node_runs(work):
    """Apply IDAdapter and Apply W+ Adapter: a NaN mask is the pack's error at once (not a NaN latent later); values
    outside 0..1 are clamped."""
    result = run_check(work, "attn_masks_checked_at_apply", {})
    for method in ("idadapter", "wplus"):
        r = result[method]
        assert r["nan_error"]["type"] == "ImageInputError" and r["nan_error"]["pack_error"], (method, r)
        assert "attn_mask contains NaN or infinite values" in r["nan_error"]["message"], (method, r)
        assert (r["held_min"], r["held_max"]) == (0.0, 1.0), (method, r)


def test_clone_shares_weights_and_input_model_stays_clean(work):
    result = run_check(work, "clone_shares_adapter", {})
    assert result == {"same_patch_object": True, "same_weights": True, "input_model_untouched": True,
                      "kv_patch_count": 14, "input_model_patch_count": 0}


def test_adapter_weights_are_loaded_and_unloaded_with_the_model(work):
    """Issue 9: ComfyUI's memory manager owns the adapter's weights (``models()``), and the pack keeps no copy."""
    result = run_check(work, "adapter_weights_follow_the_model", {})
    assert result["adapter_loaded"] and result["model_loaded"], result
    assert result["adapter_loaded_bytes"] == result["adapter_size"] > 0, result
    assert result["tensors_holding_a_weight"] == 1, result
    assert not result["adapter_loaded_after_unload"] and not result["model_loaded_after_unload"], result
    assert result["adapter_bytes_after_unload"] == 0, result


def test_text_token_equals_edited_embedding_table(work):
    """One person, and two (IDAdapter Identity Word 'ohwx' chained into IDAdapter Text Encode 'sks'): each word's
    E_c where its token is, for every family's text encoders."""
    result = run_check(work, "text_injection_matches_edited_embedding_table", {"families": ["sd15", "sd21", "sdxl"]})
    assert result["sd15-1"]["keys"] == ["l"] and result["sd21-1"]["keys"] == ["h"]
    assert result["sdxl-1"]["keys"] == ["g", "l"]
    assert result["sdxl-1"]["cond_shape"] == result["sdxl-2"]["cond_shape"] == [1, 77, 2048]
    assert len(result) == 6
    for family, r in result.items():
        assert r["max_diff"] < 1e-4 and r["pooled_diff"] < 1e-4, (family, r)
        assert r["changed_vs_plain"] > 1e-3, (family, r)


@pytest.mark.parametrize("block_inputs", [{}, {"block_preset": "speed", "block_weights": "middle: 0.5, output_1: -1"}],
                         ids=["all-blocks", "block-weights"])
def test_trainer_forward_equals_comfyui_unet(work, block_inputs):
    """Issue #5's parity on a real ComfyUI UNet, in one process with ComfyUI's `nodes`: the trainer's diffusers-bound
    forward (binding + K/V weights) equals ComfyUI's UNet with Apply IDAdapter's patches, same weights, fp32; with
    block weights, the binding gets them from the diffusers UNet's own layout (what the bench measures)."""
    result = run_check(work, "trainer_parity_sd15", block_inputs)
    assert result["dtype"] == "torch.float32" and result["adapter_effect"] > 1e-3  # the adapter does something
    assert result["close"], result


def two_identity_graph(second_weight, prefix):
    """The example graph with a second Apply IDAdapter chained after the first: the first on the left half (SolidMask
    + MaskComposite), the second on the right half at ``second_weight``."""
    prompt = graph(prefix=prefix)
    prompt.update({
        "20": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "21": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
        "22": {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["21", 0], "x": 0, "y": 0,
                                                         "operation": "add"}},
        "23": {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["21", 0], "x": 32,
                                                         "y": 0, "operation": "add"}},
        "24": {"class_type": "IDA_ApplyIDAdapter", "inputs": {"model": ["8", 0], "idadapter": ["6", 0],
               "embeds": ["7", 0], "weight": second_weight, "start_percent": 0.0, "end_percent": 1.0,
               "attn_mask": ["23", 0]}},
    })
    prompt["8"]["inputs"]["attn_mask"] = ["22", 0]
    prompt["12"]["inputs"]["model"] = ["24", 0]
    return prompt


def test_changing_a_weight_and_back_gives_the_first_output_bit_for_bit(work):
    """Run -> change the second identity's weight -> run -> change it back -> run: the last output equals the first
    bit for bit (the patch objects stay as they were; ComfyUI caches the incoming MODEL)."""
    runs = [two_identity_graph(0.5, "a"), two_identity_graph(0.9, "b"), two_identity_graph(0.5, "c")]
    result = run_check(work, "run_prompts", runs)
    assert all(run["success"] for run in result["runs"]), result
    first, changed, back = latent(work, "a"), latent(work, "b"), latent(work, "c")
    assert torch.equal(first, back)
    assert (first - changed).abs().max() > 1e-4


def test_two_identities_with_disjoint_masks_add_up_at_every_block(work):
    """Issue 18's proof, for Apply IDAdapter and Apply W+ Adapter chained twice (left and right masks): at every
    transformer block the chained MODEL's residual is the sum of the two single applies' (1e-6), each zero outside
    its mask; the K/V weights are base + one delta at the first apply's weight; the input MODELs keep theirs."""
    result = run_check(work, "two_identities_add_up", {})
    for method in ("idadapter", "wplus"):
        r = result[method]
        assert len(r["blocks"]) == 7 and r["input_model_plain"] and r["first_keeps_one_identity"], (method, r)
        for name, block in r["blocks"].items():
            assert block["sum_diff"] <= 1e-6, (method, name, block)
            assert block["r1"] > 1e-4 and block["r2"] > 1e-4, (method, name, block)
            assert block["r1_outside"] == 0 and block["r2_outside"] == 0, (method, name, block)
        assert r["kv_diff"] <= 1e-6, (method, r["kv_diff"])


def test_block_weights_at_zero_leave_their_blocks_plain(work):
    """Per-block weights in ComfyUI, for Apply IDAdapter and Apply W+ Adapter: each block re-run on the input it got
    in the patched forward gives exactly the plain block's output where its weight is 0 (the 'speed' preset: the 64
    level, input_1 and output_2-3 on this UNet), and something else where it is not; weights all 1 are the node
    without block inputs; ComfyUI's UNet and the diffusers binding read the same levels."""
    result = run_check(work, "block_weights_leave_zero_blocks_plain", {})
    assert result["downscales_comfyui"] == result["downscales_binding"] == {
        "input_1_0": 1, "input_3_0": 2, "middle_0_0": 2, "output_0_0": 2, "output_1_0": 2, "output_2_0": 1,
        "output_3_0": 1}
    for method in ("idadapter", "wplus"):
        r = result[method]
        assert r["zero_weight"] == ["input_1_0", "output_2_0", "output_3_0"], r
        assert r["plain_weights_restored"], r
        assert r["untouched"] == r["zero_weight"], (method, r)
        assert r["ones_diff"] <= 1e-6 and r["adapter_effect"] > 1e-3, (method, r)


def test_trainer_forward_equals_comfyui_sdxl_unet(work):
    """The same parity on ComfyUI's SDXL model class with an SDXL-shaped UNet (a level without attention, two
    transformer blocks per attention, the text_time ADM): the block names and K/V keys line up there too."""
    result = run_check(work, "trainer_parity_sdxl", {})
    assert result["model_class"] == "SDXL" and result["dtype"] == "torch.float32"
    assert result["blocks"] == result["trainer_blocks"] and len(result["blocks"]) == 8
    assert result["adapter_effect"] > 1e-3 and result["close"], result


def test_node_prompt_tokens_equal_the_trainers(work):
    """One recipe for both sides: for the same caption, identifier and class noun, IDAdapter Text Encode tokenizes
    exactly what the trainer trains on (ComfyUI's SD1.5 tokenizer against transformers' on the same vocabulary),
    in one process with ComfyUI's `nodes` and the trainer's modules."""
    captions = ["a photo of sks in the snow", "a photo of sks,", "  portrait of sks smiling , ", ""]
    result = run_check(work, "node_and_trainer_prompts", {"captions": captions, "identifier": "sks", "class_noun": "woman"})
    assert result["modules"] == ["comfyui_idadapter.training.diffusers_binding", "comfyui_idadapter.training.tiny", "nodes"]
    prompts = [r["prompt"] for r in result["results"]]
    assert prompts == ["a photo of sks in the snow, woman is sks", "a photo of sks, woman is sks",
                       "portrait of sks smiling, woman is sks", "woman is sks"]
    for r in result["results"]:
        assert len(r["node"]) == 77 and r["node"] == r["trainer"], r


def test_mff_embed_shows_clip_what_the_trainer_shows_it(work):
    result = run_check(work, "mff_clip_input_matches_trainer", {})
    faces, photo = result["face_crops.safetensors"], result["tiny.safetensors"]
    assert faces["margin"] == 0.5 and photo["margin"] is None
    for run in (faces, photo):
        assert run["shape"] == [4, 3, 224, 224] and run["copies_equal"], run  # one photo copied up to N = 4
        assert run["max_diff"] <= 1e-6, run  # the node's CLIP input is the trainer's, to the pixel
    assert faces["differs_from_whole_photo"] > 0.1 and photo["differs_from_whole_photo"] == 0.0


def test_adapter_attention_keeps_the_blocks_precision_and_attention_override(work):
    """The adapters' own attention runs ComfyUI's kernel as the block's does: with the block's attn_precision (float32
    here, as SD2.x asks) and through an optimized_attention_override put in the MODEL's transformer options. IDAdapter
    adds one self-attention over the block's tokens and its 4 identity tokens per block; W+ adds one attention over
    its 4 W+ tokens per block and still computes the block's text attention (77 tokens) through the kernel."""
    result = run_check(work, "attention_options_reach_the_kernel", {})
    assert result["plain"] and all(precision == "torch.float32" for _, precision in result["plain"]), result["plain"]
    for method in ("idadapter", "wplus"):
        r = result[method]
        assert len(r["added"]) >= 7 and r["lost"] == [], (method, r)  # at least one call per transformer block
        assert all(precision == "torch.float32" for _, precision in r["added"]), (method, r)

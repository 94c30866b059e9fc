"""The IDAdapter trainer on an SDXL-shaped base: both text encoders get their E_c vector, the UNet gets the
pooled text and time ids, and the export is an sdxl IDAdapter the nodes load."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from comfyui_idadapter.nodes.arch import idadapter as ida  # noqa: E402
from comfyui_idadapter.nodes.errors import ConfigError  # noqa: E402
from comfyui_idadapter.nodes.face import insightface_backend  # noqa: E402
from comfyui_idadapter.training import diffusers_binding, loop, tiny  # noqa: E402
from comfyui_idadapter.training.base_model import base_family, is_sdxl_checkpoint  # noqa: E402
from comfyui_idadapter.training.cli import parse_args  # noqa: E402
from comfyui_idadapter.training.idadapter_config import IDAdapterTrainConfig  # noqa: E402
from comfyui_idadapter.training.idadapter_models import Components  # noqa: E402
from comfyui_idadapter.training.idadapter_task import IDAdapterTask  # noqa: E402
from comfyui_idadapter.training.prompts import PromptEncoder  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {"pack": tiny.make_pack(str(root / "insightface")), "tokenizer": tiny.tiny_tokenizer(str(root / "tok")),
            "dataset": tiny.make_synthetic_dataset(str(root / "data"), 3, 3, size=64, seed=5)}


def sdxl_components(assets):
    tokenizer = assets["tokenizer"]
    text_l, text_g = tiny.tiny_sdxl_text_encoders(len(tokenizer))
    return Components(tokenizer, text_l, tiny.tiny_vae(), tiny.tiny_sdxl_unet(),
                      tiny.tiny_scheduler("epsilon"), tiny.tiny_clip_vision(),
                      tiny.random_iresnet().eval(), insightface_backend.load_analyzer(assets["pack"], "CPU"),
                      tokenizer_2=tokenizer, text_encoder_2=text_g)


def base_state(c):
    modules = {"unet": c.unet, "l": c.text_encoder, "g": c.text_encoder_2, "vae": c.vae}
    return {f"{m}.{k}": v.detach().clone() for m, module in modules.items() for k, v in module.state_dict().items()
            if ".fuser." not in k}


def test_sdxl_prompts_inject_both_encoders_and_add_pooled_text_and_time_ids(assets):
    tokenizer = assets["tokenizer"]
    text_l, text_g = tiny.tiny_sdxl_text_encoders(len(tokenizer))
    prompts = PromptEncoder("sdxl", [tokenizer, tokenizer], [text_l, text_g], "sks", 64)
    e_c = {"l": torch.randn(2, 768) * 0.05, "g": torch.randn(2, 1280) * 0.05}
    captions = ["a photo of sks, person is sks", "a photo of a person"]
    with torch.no_grad():
        context, added = prompts(captions, e_c)
        sks = tokenizer("sks", add_special_tokens=False).input_ids[0]
        ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        plain_l = text_l(ids, output_hidden_states=True)
        plain_g = text_g(ids, output_hidden_states=True)
        text_l.get_input_embeddings().weight[sks] = e_c["l"][0]
        text_g.get_input_embeddings().weight[sks] = e_c["g"][0]
        edited_l = text_l(ids[:1], output_hidden_states=True).hidden_states[-2]
        edited_g = text_g(ids[:1], output_hidden_states=True)
    assert context.shape == (2, 77, 2048) and added["text_embeds"].shape == (2, 1280)
    torch.testing.assert_close(context[:1], torch.cat([edited_l, edited_g.hidden_states[-2]], -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(added["text_embeds"][:1], edited_g.text_embeds, rtol=1e-5, atol=1e-5)
    # the row without the identifier is the plain encoding
    torch.testing.assert_close(context[1:], torch.cat([plain_l.hidden_states[-2], plain_g.hidden_states[-2]], -1)[1:])
    torch.testing.assert_close(added["text_embeds"][1:], plain_g.text_embeds[1:])
    assert added["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2
    assert (context[0] - torch.cat([plain_l.hidden_states[-2], plain_g.hidden_states[-2]], -1)[0]).abs().max() > 1e-4


def test_sdxl_run_trains_only_trainables_and_exports_an_sdxl_idadapter(tmp_path, assets):
    components = sdxl_components(assets)
    config = parse_args(IDAdapterTrainConfig, [
        "--preset", "tiny", "--dataset", assets["dataset"], "--output_dir", str(tmp_path), "--max_steps", "3",
        "--checkpoint_every", "3", "--validation_every", "3", "--report_to", "none", "--id_gate_ratio", "0"])
    task = IDAdapterTask(config, components, log=lambda *a: None)
    assert task.family == "sdxl"
    before = base_state(components)
    export = loop.run(task, config)

    after = base_state(components)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(k for k in before if ".attn2.to_k." in k or ".attn2.to_v." in k)
    assert len(changed) == 16  # 8 transformer blocks x (W_K, W_V)

    weights = ida.load_idadapter(export)
    assert weights.config.family == "sdxl" and weights.config.text_dims == {"g": 1280, "l": 768}
    ida.check_unet_compatible(weights.config, diffusers_binding.block_specs(components.unet))
    assert sorted(weights.adapter.adapters) == sorted(diffusers_binding.transformer_blocks(components.unet))
    assert len(list((tmp_path / "validation").glob("step0000003_*.png"))) == 1  # through StableDiffusionXLPipeline


def test_single_file_sdxl_checkpoints_are_recognised_from_the_header(tmp_path):
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)},
              str(tmp_path / "sd15.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    assert is_sdxl_checkpoint(str(tmp_path / "xl.safetensors"))
    assert not is_sdxl_checkpoint(str(tmp_path / "sd15.safetensors"))
    assert not is_sdxl_checkpoint(str(tmp_path / "broken.safetensors"))  # the loader reports it


def test_unsupported_bases_are_clear_errors():
    unet = tiny.tiny_sdxl_unet()
    assert base_family(unet) == "sdxl"
    unet.register_to_config(addition_embed_type=None)  # an SDXL-wide UNet without SDXL's added conditioning
    with pytest.raises(ConfigError, match="supports SD1.5 \\(768\\), SD2.x \\(1024\\) and SDXL"):
        base_family(unet)

"""Checks that run inside a ComfyUI process (started by comfyui_runner.py); each returns a JSON-able result.

They may use ComfyUI's modules (``comfy.*``, ``nodes``, ``execution``) and reach this pack's node classes
through ``nodes.NODE_CLASS_MAPPINGS``, as ComfyUI itself does.
"""

import asyncio
import json
import os

import torch
from safetensors.torch import save_file


class _Server:
    """The attributes ComfyUI's executor and progress hook use on PromptServer."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def _jsonable(value):
    import json

    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def run_prompts(work, prompts):
    """Runs API-format prompts in order in one executor (a failing prompt must not stop the next)."""
    import execution
    import folder_paths
    import nodes

    result = {
        "registered": sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("IDA_")),
        "folders": {k: folder_paths.get_folder_paths(k) for k in ("insightface", "idadapter", "face_embeds")},
        "runs": [],
    }
    executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)
    for i, prompt in enumerate(prompts):
        valid = asyncio.run(execution.validate_prompt(f"p{i}", prompt, None))
        run = {"valid": valid[0], "validation_error": _jsonable(valid[1]), "node_errors": _jsonable(valid[3])}
        if valid[0]:
            executor.execute(prompt, f"p{i}", extra_data={}, execute_outputs=valid[2])
            run["success"] = executor.success
            run["outputs"] = _jsonable(executor.history_result.get("outputs", {}))
            run["errors"] = [_jsonable(d) for e, d in executor.status_messages if e == "execution_error"]
        result["runs"].append(run)
    return result


# ---------------------------------------------------------------------------------------------------------
# a tiny SD1.5-shaped checkpoint (detected by ComfyUI as SD15), a random ViT-L/14 CLIP vision, IDAdapters

TINY_UNET_CONFIG = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
                    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1}


def _tiny_diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8,
    )


def _ldm_unet_state_dict(unet):
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(TINY_UNET_CONFIG)
    sd = unet.state_dict()
    missing = sorted(set(sd) - set(mapping))
    assert not missing, f"unmapped diffusers keys: {missing[:5]}"
    return {"model.diffusion_model." + mapping[k]: v for k, v in sd.items()}


def make_sd15_assets(work, payload):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    ckpt = os.path.join(work, "models", "checkpoints", "tiny_sd15.safetensors")
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    sd = _ldm_unet_state_dict(_tiny_diffusers_unet())
    torch.manual_seed(1)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    sd.update({"cond_stage_model.transformer." + k: v for k, v in text.state_dict().items()})
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4)
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    save_file({k: v.half().contiguous() for k, v in sd.items()}, ckpt)

    vision_path = os.path.join(work, "models", "clip_vision", "vit_l.safetensors")
    os.makedirs(os.path.dirname(vision_path), exist_ok=True)
    torch.manual_seed(2)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu"))
    save_file({k: v.half().contiguous() for k, v in vision.state_dict().items()}, vision_path)
    return {"checkpoint": ckpt, "clip_vision": vision_path}


def _load_checkpoint(work):
    import comfy.sd

    path = os.path.join(work, "models", "checkpoints", "tiny_sd15.safetensors")
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:2]


def _pack_module(name: str):
    """The pack's module ``name`` under nodes/ (``"idadapter"``, ``"arch.unet_blocks"``), as ComfyUI loaded it."""
    import nodes

    package = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"].__module__.rsplit(".", 1)[0]
    return __import__("sys").modules[f"{package}.{name}"]


def _pack_modules():
    """The pack's nodes/idadapter.py and its nodes/patches package (each job's module an attribute: the node
    modules imported them all)."""
    return _pack_module("idadapter"), _pack_module("patches")


def make_idadapters(work, payload):
    """IDAdapter files fitted to the tiny checkpoint's UNet: one trained-looking (gamma != 0, K/V deltas) on the tiny
    pack's recognizer, one untrained (gamma = 0, no deltas) that does not record its recognizer, one trained-looking
    on buffalo_l's recognizer, and the first one trained on face crops (margin 0.5)."""
    pack, patches = _pack_modules()
    ida = pack.ida
    model, _ = _load_checkpoint(work)
    blocks = patches.unet_layout.unet_transformer_blocks(model.get_model_object("diffusion_model"))
    out = {"blocks": sorted(blocks), "model_class": type(model.model).__name__,
           "model_config": type(model.model.model_config).__name__}
    tiny_recognizer = pack.insightface_backend.file_fingerprint(
        os.path.join(work, "models", "insightface", "models", "tinypack", "rec.onnx"))
    for name, gamma, kv, recognizer, margin in (
            ("tiny.safetensors", 0.8, True, tiny_recognizer, None), ("untrained.safetensors", 0.0, False, "", None),
            ("buffalo.safetensors", 0.8, True, "w600k_r50.onnx:fedcba9876543210", None),
            ("face_crops.safetensors", 0.8, True, tiny_recognizer, 0.5)):
        torch.manual_seed(3)
        cfg = ida.IDAdapterConfig(family="sd15", blocks=blocks, clip_vision_dim=1024, width=64, mff_heads=4,
                                  num_tokens=4, embed_dim=64, textual_hidden=64, face_crop_margin=margin)
        adapter = ida.IDAdapter(cfg)
        with torch.no_grad():
            for gated in adapter.adapters.values():
                gated.gamma.fill_(gamma)
        deltas = {n: {p: torch.randn(s.channels, s.context_dim) * 0.05 for p in ("to_k", "to_v")}
                  for n, s in blocks.items()} if kv else {}
        ida.save_idadapter(ida.IDAdapterWeights(adapter, deltas, recognizer),
                           os.path.join(work, "models", "idadapter", name))
    return out


def mff_clip_input_matches_trainer(work, payload):
    """What IDAdapter MFF Embed hands CLIP vision for face.png (Load Image, Load InsightFace) against what the trainer
    gives CLIP for the same file found by scan_dataset with the same pack, for an adapter trained on face crops and
    for one trained on whole photos."""
    import shutil
    import types

    import comfy.clip_vision
    import nodes

    import pack_import  # noqa: F401
    from comfyui_idadapter.training import data
    from comfyui_idadapter.training.idadapter_task import IDAdapterTask

    pack, _ = _pack_modules()
    image = nodes.LoadImage().load_image("face.png")[0]
    insightface = nodes.NODE_CLASS_MAPPINGS["IDA_LoadInsightFace"].execute("tinypack", "CPU", 640).result[0]
    clip_vision = comfy.clip_vision.load(os.path.join(work, "models", "clip_vision", "vit_l.safetensors"))
    dataset_dir = os.path.join(work, "scan", "person")
    os.makedirs(dataset_dir, exist_ok=True)
    shutil.copy(os.path.join(work, "input", "face.png"), dataset_dir)
    from comfyui_idadapter.nodes.face import insightface_backend  # the trainer's copy of the pack's modules

    analyzer = insightface_backend.load_analyzer(os.path.join(work, "models", "insightface", "models", "tinypack"),
                                                 "CPU", 640)
    identities, _ = data.scan_dataset(os.path.dirname(dataset_dir), analyzer, os.path.join(work, "scan_cache"),
                                      log=lambda *a: None)
    photo = identities[0].images[0]
    seen = {}

    class Capturing:
        image_size = clip_vision.image_size

        def encode_image(self, pixels, crop=True):
            seen["pixels"] = pixels.movedim(-1, 1).clone()
            return clip_vision.encode_image(pixels, crop=crop)

    out = {}
    for name in ("face_crops.safetensors", "tiny.safetensors"):
        loaded = nodes.NODE_CLASS_MAPPINGS["IDA_LoadIDAdapter"].execute(name).result[0]
        nodes.NODE_CLASS_MAPPINGS["IDA_IDAdapterMFFEmbed"].execute(loaded, Capturing(), image, 0, False, 0,
                                                                   insightface=insightface)
        trainer_side = types.SimpleNamespace(adapter=loaded.adapter, vision_size=clip_vision.image_size)
        ours = IDAdapterTask.load_reference(trainer_side, photo)  # the crop reference_pixels caches
        theirs = seen["pixels"]
        out[name] = {"margin": loaded.config.face_crop_margin, "shape": list(theirs.shape),
                     "copies_equal": all(torch.equal(theirs[0], t) for t in theirs),  # augment off: plain copies
                     "max_diff": float((theirs[0] - ours).abs().max()),
                     "differs_from_whole_photo": float((theirs[0] - pack.ida.reference_crop(
                         image[0].movedim(-1, 0), None, None, clip_vision.image_size)).abs().max())}
    return out


def clone_shares_adapter(work, payload):
    """A clone of the patched model shares the patch object; the unpatched input model has no patch."""
    import nodes

    pack, _ = _pack_modules()
    model, _ = _load_checkpoint(work)
    weights = pack.load_cached(os.path.join(work, "models", "idadapter", "tiny.safetensors"))
    embeds = pack.ida.IDAdapterEmbeds(torch.randn(1, 4, 64), {"l": torch.randn(768)}, "sd15")
    apply = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"]
    patched = apply.execute(model, weights, embeds, 1.0, 0.0, 1.0).result[0]
    sibling = patched.clone()
    mine = patched.model_options["transformer_options"]["patches"]["middle_patch"]
    theirs = sibling.model_options["transformer_options"]["patches"]["middle_patch"]
    return {
        "same_patch_object": mine[0] is theirs[0],
        "same_weights": mine[0].models()[0].model is theirs[0].models()[0].model,
        "input_model_untouched": "middle_patch" not in model.model_options.get("transformer_options", {}).get("patches", {}),
        "kv_patch_count": len(patched.patches),
        "input_model_patch_count": len(model.patches),
    }


def adapter_weights_follow_the_model(work, payload):
    """KSampler with Apply IDAdapter, as ComfyUI's memory manager sees it: is the adapter's patcher among the loaded
    models while the UNet runs (and the MODEL with it), is it unloaded by unloading everything, and how many
    tensors in the process hold the values of one adapter weight (1: the module the patcher owns)."""
    import gc

    import comfy.model_management
    import nodes

    pack, _ = _pack_modules()
    model, clip = _load_checkpoint(work)
    idadapter = nodes.NODE_CLASS_MAPPINGS["IDA_LoadIDAdapter"].execute("tiny.safetensors").result[0]
    embeds = pack.ida.IDAdapterEmbeds(torch.randn(1, 4, 64), {"l": torch.randn(768)}, "sd15")
    patched = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"].execute(model, idadapter, embeds, 1.0, 0.0, 1.0).result[0]
    adapters = idadapter.adapter.adapters  # the gated-attention modules the UNet patch runs
    seen = {}

    def loaded_patcher(module):
        return next((m.model for m in comfy.model_management.current_loaded_models
                     if m.model is not None and m.model.model is module), None)

    def probe(x, extra_options):  # after the adapter's patch, in every transformer block
        if not seen:
            patcher = loaded_patcher(adapters)
            seen.update(adapter_loaded=patcher is not None, model_loaded=loaded_patcher(model.model) is not None,
                        adapter_loaded_bytes=0 if patcher is None else patcher.loaded_size())
        return x

    patched.set_model_patch(probe, "middle_patch")
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    nodes.common_ksampler(patched, 0, 2, 2.0, "euler", "normal", positive, negative, {"samples": torch.zeros(1, 4, 8, 8)})

    weight = adapters["input_1_0"].proj.weight
    gc.collect()
    holders = sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.shape == weight.shape
                  and torch.equal(obj.detach().float().cpu(), weight.detach().float().cpu()))
    comfy.model_management.unload_all_models()
    return dict(seen, tensors_holding_a_weight=holders, adapter_size=comfy.model_management.module_size(adapters),
                adapter_loaded_after_unload=loaded_patcher(adapters) is not None,
                model_loaded_after_unload=loaded_patcher(model.model) is not None,
                adapter_bytes_after_unload=idadapter.patcher.loaded_size())


def _random_clip(kind):
    """A ComfyUI CLIP of the given family with random weights (ComfyUI builds its modules uninitialised)."""
    import comfy.sd
    import comfy.supported_models as sm

    target = {"sd21": sm.SD20, "sdxl": sm.SDXL}[kind]({"context_dim": 1024}).clip_target()
    clip = comfy.sd.CLIP(target=target, embedding_directory=None)
    gen = torch.Generator().manual_seed(4)
    model = clip.cond_stage_model
    model.load_state_dict({k: (torch.randn(v.shape, generator=gen) * 0.02).to(v.dtype) if v.is_floating_point() else v
                           for k, v in model.state_dict().items()})
    return clip


def _token_embeddings(clip):
    """Each text encoder's token embedding table, by tokens key ("l", "h", "g")."""
    tables = {}
    for name, module in clip.cond_stage_model.named_modules():
        if name.endswith("embeddings.token_embedding"):
            key = "g" if "clip_g" in name else "h" if "clip_h" in name else "l"
            tables[key] = module
    return tables


def text_injection_matches_edited_embedding_table(work, payload):
    """IDAdapter Text Encode equals encoding the same prompt with the identifier's row of each encoder's token
    embedding table replaced by E_c; with a second person (IDAdapter Identity Word on 'ohwx'), both rows replaced."""
    import nodes

    encode = nodes.NODE_CLASS_MAPPINGS["IDA_IDAdapterTextEncode"]
    second_word = nodes.NODE_CLASS_MAPPINGS["IDA_IDAdapterIdentityWord"]
    ida = _pack_module("idadapter").ida
    results = {}
    for family in payload["families"]:
        for people in (1, 2):
            clip = _load_checkpoint(work)[1] if family == "sd15" else _random_clip(family)
            tables = _token_embeddings(clip)
            gen = torch.Generator().manual_seed(5)
            # rounded to the table's dtype so that writing them into the table loses nothing
            vectors = [{k: (torch.randn(t.weight.shape[1], generator=gen) * 0.02).to(t.weight.dtype).float()
                        for k, t in tables.items()} for _ in range(people)]
            embeds = [ida.IDAdapterEmbeds(torch.zeros(1, 4, 8), v, family) for v in vectors]
            if people == 1:
                prompt = "a photo of sks in the snow, woman is sks"  # what the node encodes with the class phrase on
                ours = encode.execute(clip, embeds[0], "a photo of sks in the snow", "sks", "woman", True).result[0]
            else:
                prompt = "a photo of sks and ohwx in the snow, woman is sks, man is ohwx"
                words = second_word.execute(embeds[1], "ohwx", "man").result[0]
                ours = encode.execute(clip, embeds[0], "a photo of sks and ohwx in the snow", "sks", "woman", True,
                                      identity_words=words).result[0]
            plain = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
            for word, vector in zip(("sks", "ohwx"), vectors):
                ids = clip.tokenize(word)
                for key, table in tables.items():  # edits this CLIP's table in place: it is not used afterwards
                    with torch.no_grad():
                        table.weight[ids[key][0][1][0]] = vector[key].to(table.weight)
            reference = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
            results[f"{family}-{people}"] = {
                "keys": sorted(tables),
                "cond_shape": list(ours[0][0].shape),
                "max_diff": float((ours[0][0] - reference[0][0]).abs().max()),
                "pooled_diff": float((ours[0][1]["pooled_output"] - reference[0][1]["pooled_output"]).abs().max())
                if ours[0][1].get("pooled_output") is not None else 0.0,
                "changed_vs_plain": float((ours[0][0] - plain[0][0]).abs().max()),
            }
    return results


def trainer_parity_sd15(work, payload):
    """Issue #5's parity, in one process: ComfyUI's UNet of the tiny checkpoint with Apply IDAdapter's patches
    (weight 0.7) against the trainer's diffusers UNet with the same weights, the binding and 0.7 x the K/V deltas."""
    import comfy.utils

    pack, _ = _pack_modules()
    model, _ = _load_checkpoint(work)
    adapter_path = os.path.join(work, "models", "idadapter", "tiny.safetensors")
    gen = torch.Generator().manual_seed(6)
    inputs = {"x": torch.randn(2, 4, 8, 8, generator=gen), "t": torch.tensor([500, 500]),
              "text": torch.randn(2, 77, 768, generator=gen), "tokens": torch.randn(1, 4, 64, generator=gen)}
    embeds = pack.ida.IDAdapterEmbeds(inputs["tokens"], {"l": torch.zeros(768)}, "sd15")
    base = {k: v.detach().float().clone() for k, v in model.model.state_dict().items()}  # before the K/V patches land
    # payload: optionally the node's block_preset / block_weights, which the trainer's side gets as the same
    # {block: weight} computed from the diffusers UNet's own layout
    theirs, dtype = _comfyui_unet_with_idadapter(model, pack.load_cached(adapter_path), embeds, inputs, payload)
    unet = _tiny_diffusers_unet()
    mapping = comfy.utils.unet_to_diffusers(TINY_UNET_CONFIG)
    unet.load_state_dict({d: base["diffusion_model." + name] for d, name in mapping.items()
                          if "diffusion_model." + name in base})  # the map also names keys this UNet lacks
    block_weights = None
    if payload:
        import pack_import  # noqa: F401
        from comfyui_idadapter.nodes.arch import block_weights as bw
        from comfyui_idadapter.training import diffusers_binding

        levels = bw.block_levels(diffusers_binding.block_downscales(unet), "sd15")
        block_weights = bw.block_weights(payload.get("block_preset", "paper"), payload.get("block_weights", ""),
                                         levels)
    plain, ours = _trainer_unet_with_idadapter(unet.eval(), adapter_path, inputs, block_weights)
    return _parity(theirs, ours, plain, dtype)


# the SDXL shape in miniature: level 0 without attention, 2 transformer blocks per attention, text_time ADM
TINY_SDXL_UNET_CONFIG = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 2],
                         "transformer_depth_output": [0, 0, 2, 2], "transformer_depth_middle": 2}
TINY_SDXL_ADM = 1280 + 6 * 8  # pooled text + 6 time ids x 8 Fourier features


def _tiny_sdxl_diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2), cross_attention_dim=2048,
        attention_head_dim=4, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TINY_SDXL_ADM,
    )


def trainer_parity_sdxl(work, payload):
    """The same parity on ComfyUI's SDXL model class with the tiny SDXL-shaped UNet (a level without attention, two
    transformer blocks per attention, the text_time ADM) and an sdxl IDAdapter made here for its blocks."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    pack, patches = _pack_modules()
    ida = pack.ida
    unet = _tiny_sdxl_diffusers_unet().eval()
    unet_config = dict(TINY_SDXL_UNET_CONFIG, in_channels=4, out_channels=4, model_channels=32, context_dim=2048,
                       use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
                       num_classes="sequential", adm_in_channels=TINY_SDXL_ADM, image_size=None,
                       use_temporal_attention=False, use_temporal_resblock=False)
    config = comfy.supported_models.SDXL(unet_config)
    config.unet_config["num_head_channels"] = 16  # SDXL's 64-channel heads would leave this narrow UNet one head
    model = config.get_model({})
    mapping = comfy.utils.unet_to_diffusers(TINY_SDXL_UNET_CONFIG)
    missing, unexpected = model.diffusion_model.load_state_dict(
        {mapping[k]: v for k, v in unet.state_dict().items()}, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    blocks = patches.unet_layout.unet_transformer_blocks(model.diffusion_model)
    torch.manual_seed(4)
    cfg = ida.IDAdapterConfig(family="sdxl", blocks=blocks, clip_vision_dim=1280, width=32, mff_heads=2, num_tokens=4,
                              embed_dim=64, textual_hidden=32)
    adapter = ida.IDAdapter(cfg)
    with torch.no_grad():
        for gated in adapter.adapters.values():
            gated.gamma.fill_(0.8)
    deltas = {n: {p: torch.randn(s.channels, s.context_dim) * 0.05 for p in ("to_k", "to_v")} for n, s in blocks.items()}
    adapter_path = os.path.join(work, "sdxl_adapter.safetensors")
    ida.save_idadapter(ida.IDAdapterWeights(adapter, deltas), adapter_path)

    gen = torch.Generator().manual_seed(7)
    added = {"text_embeds": torch.randn(2, 1280, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():  # ComfyUI's y is diffusers' added-embedding input: pooled text + time-id Fourier features
        y = torch.cat([added["text_embeds"], unet.add_time_proj(added["time_ids"].flatten()).reshape(2, -1)], -1)
    inputs = {"x": torch.randn(2, 4, 8, 8, generator=gen), "t": torch.tensor([500, 500]),
              "text": torch.randn(2, 77, 2048, generator=gen), "tokens": torch.randn(1, 4, 64, generator=gen)}
    embeds = ida.IDAdapterEmbeds(inputs["tokens"], {"g": torch.zeros(1280), "l": torch.zeros(768)}, "sdxl")
    theirs, dtype = _comfyui_unet_with_idadapter(patcher, pack.load_cached(adapter_path), embeds, inputs, y=y)
    plain, ours = _trainer_unet_with_idadapter(unet, adapter_path, inputs, added_cond_kwargs=added)
    return dict(_parity(theirs, ours, plain, dtype), model_class=type(model).__name__, blocks=sorted(blocks),
                trainer_blocks=sorted(_trainer_blocks(unet)))


def _comfyui_unet_with_idadapter(model, weights, embeds, inputs, node_kwargs=None, **unet_kwargs):
    """Apply IDAdapter (weight 0.7, and ``node_kwargs``) on ``model``, then its UNet on ``inputs`` with the cond
    chunk second."""
    import comfy.model_management
    import nodes

    patched = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"].execute(model, weights, embeds, 0.7, 0.0, 1.0,
                                                                      **(node_kwargs or {})).result[0]
    comfy.model_management.load_models_gpu([patched], force_patch_weights=True)
    dm = patched.model.diffusion_model
    options = {"patches": patched.model_options["transformer_options"]["patches"], "cond_or_uncond": [1, 0],
               "sigmas": torch.tensor([1.0])}
    dtype = dm.input_blocks[0][0].weight.dtype
    with torch.no_grad():
        out = dm(inputs["x"].to(dtype), timesteps=inputs["t"], context=inputs["text"].to(dtype),
                 transformer_options=options, **unet_kwargs)
    return out.float(), dtype


def _tiny_model(work):
    """The tiny checkpoint's MODEL, a copy of its weights as loaded, and its transformer blocks."""
    _, patches = _pack_modules()
    model, _ = _load_checkpoint(work)
    base = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    return model, base, patches.unet_layout.unet_transformer_blocks(model.get_model_object("diffusion_model"))


def _inputs_for_both_adapters(work, pack, patches, wplus, unet_blocks, seed: int, wplus_seed: int):
    """What the checks that apply both methods to one tiny MODEL give them: a latent pair and text, the tiny IDAdapter
    with random embeds, and a random W+ adapter (made with ``wplus_seed``) with one random code."""
    gen = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    idadapter = pack.load_cached(os.path.join(work, "models", "idadapter", "tiny.safetensors"))
    embeds = pack.ida.IDAdapterEmbeds(torch.randn(1, 4, 64, generator=gen), {"l": torch.zeros(768)}, "sd15")
    adapter = _random_wplus(wplus, unet_blocks, wplus_seed)
    loaded_wplus = wplus.LoadedModel(patches.memory.module_patcher(adapter), adapter.config)
    return x, text, idadapter, embeds, loaded_wplus, torch.randn(1, 18, 512, generator=gen)


def block_weights_leave_zero_blocks_plain(work, payload):
    """Apply IDAdapter (weight 0.7) and Apply W+ Adapter (scale 0.8) on the tiny checkpoint with block_preset
    ``speed`` and block_weights ``middle: 0.5``. Each transformer block's input and output are recorded in the patched
    forward; then, with the plain MODEL loaded (its weights checked against the checkpoint's), each block is run
    again on its recorded input without patches. Returns which blocks gave exactly the plain output, which were set to
    0, whether all weights 1 equals the node without block inputs, and the downscales ComfyUI's UNet and the
    diffusers binding read."""
    import comfy.model_management
    import nodes

    import pack_import  # noqa: F401
    from comfyui_idadapter.training import diffusers_binding

    pack, patches = _pack_modules()
    wplus = _pack_module("wplus")
    model, base, unet_blocks = _tiny_model(work)
    x, text, idadapter, embeds, loaded_wplus, codes = _inputs_for_both_adapters(work, pack, patches, wplus,
                                                                                unet_blocks, seed=12, wplus_seed=13)
    methods = {
        "idadapter": lambda **kw: nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"].execute(
            model, idadapter, embeds, 0.7, 0.0, 1.0, **kw).result[0],
        "wplus": lambda **kw: nodes.NODE_CLASS_MAPPINGS["IDA_ApplyWPlusAdapter"].execute(
            model, loaded_wplus, codes, 0.8, 0.0, 1.0, **kw).result[0],
    }

    def forward(patcher, records=None):
        comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
        dm = patcher.model.diffusion_model
        given = patcher.model_options.get("transformer_options", {})
        options = {"patches": given.get("patches", {}), "patches_replace": given.get("patches_replace", {}),
                   "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0])}
        hooks = []
        if records is not None:
            for name, block, _ in patches.unet_layout._walk_transformer_blocks(dm):
                def record(module, args, kwargs, output, name=name):
                    records[name] = (args[0].clone(), kwargs["context"], dict(kwargs["transformer_options"]),
                                     output.clone())
                hooks.append(block.register_forward_hook(record, with_kwargs=True))
        try:
            with torch.no_grad():
                return dm(x, timesteps=torch.tensor([500, 500]), context=text, transformer_options=options)
        finally:
            for hook in hooks:
                hook.remove()

    layout = patches.unet_layout
    result = {"downscales_comfyui": layout.unet_block_downscales(model.get_model_object("diffusion_model")),
              "downscales_binding": diffusers_binding.block_downscales(_tiny_diffusers_unet())}
    for method, apply in methods.items():
        records = {}
        forward(apply(block_preset="speed", block_weights="middle: 0.5"), records)
        comfy.model_management.load_models_gpu([model], force_patch_weights=True)
        dm = model.model.diffusion_model
        restored = all(torch.equal(v, base[k]) for k, v in model.model.state_dict().items())
        untouched = []
        with torch.no_grad():
            for name, block, _ in layout._walk_transformer_blocks(dm):
                y, context, options, patched_out = records[name]
                plain_options = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
                if torch.equal(block(y, context=context, transformer_options=plain_options), patched_out):
                    untouched.append(name)
        zero = sorted(n for n, w in layout.unet_block_weights(dm, "sd15", unet_blocks, "speed", "middle: 0.5")
                      .items() if w == 0)
        default, ones = forward(apply()), forward(apply(block_preset="paper", block_weights="64: 1, 32: 1"))
        result[method] = {"untouched": sorted(untouched), "zero_weight": zero, "plain_weights_restored": restored,
                          "ones_diff": float((default - ones).abs().max()),
                          "adapter_effect": float((default - forward(model)).abs().max())}
    return result


def _trainer_blocks(unet):
    import pack_import  # noqa: F401  (the checkout as `comfyui_idadapter`, beside ComfyUI's `nodes`)
    from comfyui_idadapter.training import diffusers_binding

    return diffusers_binding.transformer_blocks(unet)


def _trainer_unet_with_idadapter(unet, adapter_path, inputs, block_weights=None, **unet_kwargs):
    """The trainer's side on a diffusers UNet: (plain output, output with the binding and 0.7 x the K/V deltas, both
    times ``block_weights``)."""
    import pack_import  # noqa: F401
    from comfyui_idadapter.nodes.arch.idadapter import load_idadapter
    from comfyui_idadapter.training import diffusers_binding

    weights = load_idadapter(adapter_path)
    with torch.no_grad():
        plain = unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["text"], **unet_kwargs).sample
        # Apply scales the K/V deltas by its weight too
        diffusers_binding.add_kv_deltas(unet, weights.kv_deltas, 0.7, block_weights)
        diffusers_binding.attach(unet, weights.adapter)
        kwargs = diffusers_binding.idadapter_kwargs(inputs["tokens"], torch.tensor([False, True]), beta=0.7,
                                                    block_weights=block_weights)
        ours = unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["text"], cross_attention_kwargs=kwargs,
                    **unet_kwargs).sample
    return plain, ours


def _parity(theirs, ours, plain, dtype):
    return {"dtype": str(dtype), "adapter_effect": float((ours - plain).abs().max()),
            "max_diff": float((ours - theirs).abs().max()),
            "close": bool(torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5))}


def node_and_trainer_prompts(work, payload):
    """IDAdapter Text Encode's tokens and the trainer's for the same caption, identifier and class noun, in one
    process that holds ComfyUI's ``nodes``, the pack as ComfyUI loaded it and the trainer's modules."""
    import sys

    import comfy.sd1_clip
    import nodes
    import pack_import  # noqa: F401  (the checkout as `comfyui_idadapter`, beside ComfyUI's `nodes`)
    from transformers import CLIPTokenizer

    from comfyui_idadapter.training import diffusers_binding, tiny  # noqa: F401  (importable here too)
    from comfyui_idadapter.training.prompts import PromptEncoder

    encode = nodes.NODE_CLASS_MAPPINGS["IDA_IDAdapterTextEncode"]
    ida = _pack_module("idadapter").ida
    clip = _load_checkpoint(work)[1]
    seen = []

    class RecordingClip:
        """The node's CLIP, remembering what the node tokenized."""

        def tokenize(self, text, **kwargs):
            tokens = clip.tokenize(text, **kwargs)
            if not kwargs.get("return_word_ids"):  # the prompt (the node also tokenizes the word alone)
                seen.append(tokens)
            return tokens

        def encode_from_tokens_scheduled(self, tokens):
            return clip.encode_from_tokens_scheduled(tokens)

    # ComfyUI's copy of the SD1.5 vocabulary; model_max_length as SD1.5's own tokenizer files set it
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer"),
                                              model_max_length=77)
    trainer = PromptEncoder("sd15", [tokenizer], [None], payload["identifier"], 512)
    embeds = ida.IDAdapterEmbeds(torch.zeros(1, 4, 8), {"l": torch.zeros(768)}, "sd15")
    results = []
    for caption in payload["captions"]:
        encode.execute(RecordingClip(), embeds, caption, payload["identifier"], payload["class_noun"], True)
        node_ids = [entry[0] for entry in seen[-1]["l"][0]]
        prompt = trainer.prompt(caption, payload["class_noun"])
        results.append({"prompt": prompt, "node": node_ids, "trainer": trainer.tokenize([prompt])[0][0].tolist()})
    return {"modules": sorted(m for m in ("nodes", "comfyui_idadapter.training.tiny",
                                          "comfyui_idadapter.training.diffusers_binding") if m in sys.modules),
            "results": results}


# ---------------------------------------------------------------------------------------------------------
# AdaFace: an adaface/1 file sized for the tiny checkpoint's CLIP-L (768 wide, CLIP's vocabulary), few layers


def _random_text_model(ada, layers, multipliers, seed):
    cfg = ada.TextModelConfig(intermediate_size=64, num_layers=layers, kv_multipliers=multipliers)
    model = ada.CLIPTextTransformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            around = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            p.copy_(around + torch.randn(p.shape, generator=gen) * 0.02)
    return cfg, model


def make_adafaces(work, payload):
    """tiny_adaface.safetensors (inverter with K/V multipliers [2, 4], padding embeddings, Arc2Face encoder
    bundled) and inverter_only.safetensors (no encoder), in models/adaface/."""
    ada = _pack_module("adaface").ada
    inverter_cfg, inverter = _random_text_model(ada, 2, [2, 4], seed=7)
    encoder_cfg, encoder = _random_text_model(ada, 1, [1], seed=8)
    pad = torch.randn(77, 768, generator=torch.Generator().manual_seed(9)) * 0.02
    folder = os.path.join(work, "models", "adaface")
    os.makedirs(folder, exist_ok=True)
    layer_weights = torch.tensor([[1.0], [2.0], [4.0]])
    ada.save_adaface(ada.AdaFaceWeights(ada.AdaFaceConfig(inverter_cfg, encoder_cfg), inverter, layer_weights, pad,
                                        encoder), os.path.join(folder, "tiny_adaface.safetensors"), torch.float16)
    ada.save_adaface(ada.AdaFaceWeights(ada.AdaFaceConfig(inverter_cfg), inverter, layer_weights),
                     os.path.join(folder, "inverter_only.safetensors"), torch.float16)
    # the same encoder as Arc2Face releases it: a transformers CLIPTextModel folder (4.x key names)
    encoder_folder = os.path.join(folder, "arc2face", "encoder")
    os.makedirs(encoder_folder)
    save_file({k: v.half().contiguous() for k, v in encoder.state_dict().items()},
              os.path.join(encoder_folder, "model.safetensors"))
    with open(os.path.join(encoder_folder, "config.json"), "w") as f:
        json.dump({"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
                   "intermediate_size": encoder_cfg.intermediate_size, "num_hidden_layers": encoder_cfg.num_layers,
                   "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                   "layer_norm_eps": 1e-5}, f)
    return sorted(os.listdir(folder))


def adaface_encoder_folder(work, payload):
    """Load AdaFace lists the encoder folder (and not its weights as an inverter); an inverter file with that
    encoder gives the tokens of the file that bundles the same encoder."""
    import nodes

    module = _pack_module("adaface")
    load = nodes.NODE_CLASS_MAPPINGS["IDA_LoadAdaFace"]
    options = {i.id: i.options for i in load.define_schema().inputs}
    faces = _face_embeds(module)
    from_folder = module.identity_vectors(load.execute("inverter_only.safetensors", "arc2face/encoder").result[0],
                                          faces, 1.0)
    bundled = module.identity_vectors(load.execute("tiny_adaface.safetensors", module.BUNDLED_ENCODER).result[0],
                                      faces, 1.0)
    return {"inverters": options["inverter"], "encoders": options["arc2face_encoder"],
            "max_diff": float((from_folder - bundled).abs().max())}


def _face_embeds(module, count=2, seed=10):
    vectors = torch.nn.functional.normalize(torch.randn(count, 512, generator=torch.Generator().manual_seed(seed)),
                                            dim=-1)
    return module.FaceEmbedsValue(vectors)


# 16 words that CLIP keeps as one token each, absent from the test prompts: the reference writes them where the
# identity goes, with their rows of the token table set to the identity's vectors
REFERENCE_WORDS = "dog cat car tree house river mountain bird fish book chair table lamp door window road".split()


def adaface_conditioning_matches_reference(work, payload):
    """AdaFace Encode equals encoding the prompt with 16 stand-in words whose token-table rows hold the identity's
    vectors: placeholder present, absent (appended) and in a prompt longer than 77 tokens."""
    import nodes

    module = _pack_module("adaface")
    ada = module.ada
    _, clip = _load_checkpoint(work)
    adaface = nodes.NODE_CLASS_MAPPINGS["IDA_LoadAdaFace"].execute("tiny_adaface.safetensors",
                                                                   module.BUNDLED_ENCODER).result[0]
    faces = _face_embeds(module)
    vectors = module.identity_vectors(adaface, faces, 1.0)
    direct = adaface.patcher.model(faces.embeds, 1.0)  # the arch module, run directly on the CPU
    long_head = " ".join(["red"] * 70)
    cases = {"present": ("a photo of z in the snow", "a photo of {} in the snow"),
             "absent": ("a photo in the snow", "a photo in the snow {}"),
             "long": (f"{long_head} z, smiling", f"{long_head} {{}}, smiling")}
    encode = nodes.NODE_CLASS_MAPPINGS["IDA_AdaFaceEncode"]
    ours = {name: encode.execute(clip, adaface, faces, text, "z", 1.0).result[0] for name, (text, _) in cases.items()}

    ids = [clip.tokenize(word)["l"][0][1][0] for word in REFERENCE_WORDS]
    single = all(clip.tokenize(word)["l"][0][2][0] == 49407 for word in REFERENCE_WORDS)
    table = _token_embeddings(clip)["l"]
    with torch.no_grad():  # edits this CLIP's table in place: it is not used afterwards
        for token, vector in zip(ids, vectors):
            table.weight[token] = vector.to(table.weight)
    written = table.weight[ids].float()
    out = {"single_token_words": single, "vectors_shape": list(vectors.shape),
           "vectors_vs_direct": float((vectors - direct).abs().max()),
           "vectors_vs_table": float((vectors - written).abs().max()),
           "arc2face_ids": clip.tokenize("photo of a id person")["l"][0][:7] == [
               (int(t), 1.0) for t in ada.arc2face_prompt_ids()[:7]],
           "template_ids": [t for t, _ in clip.tokenize("photo of a " + ", " * 18)["l"][0][:23]]
           == ada.inverter_template_ids(16)[:23].tolist()}
    for name, (_, reference_text) in cases.items():
        reference = clip.encode_from_tokens_scheduled(clip.tokenize(reference_text.format(" ".join(REFERENCE_WORDS))))
        out[name] = {"shape": list(ours[name][0][0].shape), "reference_shape": list(reference[0][0].shape),
                     "max_diff": float((ours[name][0][0] - reference[0][0]).abs().max())
                     if ours[name][0][0].shape == reference[0][0].shape else None}
    return out


def saved_embedding_matches_encode(work, payload):
    """Save AdaFace Embedding writes a TI file that ComfyUI's own embedding loader reads, and embedding:<name>
    in CLIPTextEncode gives AdaFace Encode's conditioning."""
    import comfy.sd1_clip
    import folder_paths
    import nodes

    module = _pack_module("adaface")
    adaface = nodes.NODE_CLASS_MAPPINGS["IDA_LoadAdaFace"].execute("tiny_adaface.safetensors",
                                                                   module.BUNDLED_ENCODER).result[0]
    faces = _face_embeds(module)
    save = nodes.NODE_CLASS_MAPPINGS["IDA_SaveAdaFaceEmbedding"]
    word = save.execute(adaface, faces, 1.0, "tiny_person", False).result[0]
    clip = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[1]  # with the embeddings folder
    folder = folder_paths.get_folder_paths("embeddings")
    loaded = comfy.sd1_clip.load_embed("tiny_person", folder, 768, "clip_l")
    vectors = module.identity_vectors(adaface, faces, 1.0)
    ours = nodes.NODE_CLASS_MAPPINGS["IDA_AdaFaceEncode"].execute(clip, adaface, faces, "a photo of z in the snow",
                                                                  "z", 1.0).result[0]
    theirs = nodes.CLIPTextEncode().encode(clip, f"a photo of {word} in the snow")[0]
    try:
        save.execute(adaface, _face_embeds(module, seed=11), 1.0, "tiny_person", False)
        second = "written"
    except Exception as exc:  # the pack's ConfigError
        second = f"{type(exc).__name__}: {exc}"
    mode = os.stat(os.path.join(folder[0], "tiny_person.safetensors")).st_mode & 0o777
    plain = nodes.CLIPTextEncode().encode(clip, "a photo of person in the snow")[0]
    # two people in one prompt: AdaFace Encode's z plus an AdaFace Identity Word's y, against two saved embeddings
    other_faces = _face_embeds(module, seed=12)
    other = save.execute(adaface, other_faces, 1.0, "tiny_other", False).result[0]
    y = nodes.NODE_CLASS_MAPPINGS["IDA_AdaFaceIdentityWord"].execute(adaface, other_faces, "y", 1.0).result[0]
    both = nodes.NODE_CLASS_MAPPINGS["IDA_AdaFaceEncode"].execute(clip, adaface, faces, "z and y in the snow", "z", 1.0,
                                                                  identity_words=y).result[0]
    both_theirs = nodes.CLIPTextEncode().encode(clip, f"{word} and {other} in the snow")[0]
    return {"word": word, "loaded_shape": list(loaded.shape), "loaded_diff": float((loaded - vectors).abs().max()),
            "cond_diff": float((ours[0][0] - theirs[0][0]).abs().max()),
            "two_people_diff": float((both[0][0] - both_theirs[0][0]).abs().max()),
            "changed_vs_plain": float((ours[0][0] - plain[0][0]).abs().max()),
            "second_save": second, "mode": oct(mode)}


def adaface_refuses_other_families(work, payload):
    """AdaFace Encode with an SD2.x or SDXL CLIP: the pack's error, naming both families."""
    import nodes

    module = _pack_module("adaface")
    adaface = nodes.NODE_CLASS_MAPPINGS["IDA_LoadAdaFace"].execute("tiny_adaface.safetensors",
                                                                   module.BUNDLED_ENCODER).result[0]
    encode = nodes.NODE_CLASS_MAPPINGS["IDA_AdaFaceEncode"]
    messages = {}
    for family in ("sd21", "sdxl"):
        try:
            encode.execute(_random_clip(family), adaface, _face_embeds(module), "a photo of z", "z", 1.0)
            messages[family] = "encoded"
        except Exception as exc:
            messages[family] = f"{type(exc).__name__}: {exc}"
    return messages


def adaface_tokens_of_file(work, payload):
    """Load AdaFace + the nodes' face -> tokens path on a file, for faces and tokens computed elsewhere (the
    trainer): the largest difference per face."""
    import nodes
    from safetensors.torch import load_file

    module = _pack_module("adaface")
    adaface = nodes.NODE_CLASS_MAPPINGS["IDA_LoadAdaFace"].execute(payload["file"], module.BUNDLED_ENCODER).result[0]
    expected = load_file(payload["expected"])
    diffs = [float((module.identity_vectors(adaface, module.FaceEmbedsValue(face[None]), 1.0) - tokens).abs().max())
             for face, tokens in zip(expected["faces"], expected["tokens"])]
    return {"diffs": diffs, "multipliers": adaface.config.inverter.kv_multipliers}


# ---------------------------------------------------------------------------------------------------------
# W+ adapter: an adapter fitted to the tiny checkpoint's UNet, a full-size e4e encoder with random weights and two
# direction files, in models/wplus/


def _random_wplus(module, blocks, seed: int):
    """A W+ adapter for ``blocks`` with random N(0, 0.05) weights (``module``: the pack's nodes/wplus.py)."""
    torch.manual_seed(seed)
    adapter = module.wplus_arch.WPlusAdapter(module.wplus_arch.WPlusAdapterConfig("sd15", blocks))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.05)
    return adapter


def make_wplus_assets(work, payload):
    import numpy as np

    module = _pack_module("wplus")
    _, patches = _pack_modules()
    model, _ = _load_checkpoint(work)
    blocks = patches.unet_layout.unet_transformer_blocks(model.get_model_object("diffusion_model"))
    folder = os.path.join(work, "models", "wplus")
    os.makedirs(os.path.join(folder, "directions"), exist_ok=True)
    adapter = _random_wplus(module, blocks, 5)
    module.wplus_arch.save_wplus_adapter(module.wplus_arch.WPlusAdapterWeights(adapter, "test"),
                                         os.path.join(folder, "tiny_wplus.safetensors"))
    e4e = module.e4e_arch
    encoder = e4e.Encoder4Editing().eval()
    latent_avg = torch.randn(18, 512) * 0.5
    e4e.save_e4e(e4e.E4EWeights(encoder, latent_avg), os.path.join(folder, "tiny_e4e.safetensors"), torch.float16)
    # the same in the official layout (pSp's dict: encoder and decoder weights, opts, latent_avg), in fp16 to keep
    # the file at half the size
    state = {f"encoder.{k}": v.half() if v.is_floating_point() else v for k, v in encoder.state_dict().items()}
    state["decoder.style.1.weight"] = torch.zeros(512, 512, dtype=torch.float16)
    torch.save({"state_dict": state, "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": 1024},
                "latent_avg": latent_avg}, os.path.join(folder, "tiny_e4e_official.pt"))
    direction = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)
    torch.save(direction, os.path.join(folder, "directions", "age.pt"))
    np.save(os.path.join(folder, "directions", "smile.npy"), np.random.default_rng(0).standard_normal((18, 512)))
    return sorted(blocks)


def wplus_patch_wiring(work, payload):
    """Apply W+ Adapter on a MODEL that already has another pack's attn2 replace patch at one block: ours chains to
    it, the input MODEL keeps exactly its own patch, and ComfyUI's memory manager sees the adapter's patcher."""
    import nodes

    model, _ = _load_checkpoint(work)
    other = model.clone()

    def other_pack(q, k, v, extra_options):
        return q * 0

    other.set_model_attn2_replace(other_pack, "input", 1, 0)
    adapter = nodes.NODE_CLASS_MAPPINGS["IDA_LoadWPlusAdapter"].execute("tiny_wplus.safetensors").result[0]
    apply = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyWPlusAdapter"]
    codes = torch.randn(1, 18, 512)
    ours = apply.execute(other, adapter, codes, 1.0, 0.2, 1.0).result[0]
    replaces = ours.model_options["transformer_options"]["patches_replace"]["attn2"]
    theirs = other.model_options["transformer_options"]["patches_replace"]["attn2"]
    zero = apply.execute(model, adapter, codes, 0.0, 0.2, 1.0).result[0]
    return {"ours": sorted("_".join(map(str, k)) for k in replaces),
            "chained": getattr(replaces[("input", 1, 0)], "previous", None) is other_pack,
            "others_unchained": all(getattr(p, "previous", None) is None
                                    for k, p in replaces.items() if k != ("input", 1, 0)),
            "input_model_keeps_its_own": list(theirs) == [("input", 1, 0)] and theirs[("input", 1, 0)] is other_pack,
            "patcher_in_models": adapter.patcher in replaces[("input", 1, 0)].models(),
            "scale_zero_patches": len(zero.model_options.get("transformer_options", {}).get("patches_replace", {})
                                      .get("attn2", {}))}


def wplus_named_ganspace_edit(work, payload):
    """W+ Edit on a GANSpace PCA of ffhq_pca.pt's layout: a named edit moves only its official rows by its official
    strength; a call without the newer ``ganspace_edit`` input (a workflow saved before it) edits as before."""
    import nodes

    edits = _pack_module("wplus").wplus_edits
    gen = torch.Generator().manual_seed(7)
    components, _ = torch.linalg.qr(torch.randn(512, 80, generator=gen, dtype=torch.float64))
    path = os.path.join(work, "models", "wplus", "directions", "ffhq_pca.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"mean": torch.randn(1, 512, generator=gen) * 0.1,
                "comp": components.T.float().reshape(80, 1, 512).contiguous(),
                "std": torch.rand(80, generator=gen) + 0.5}, path)
    pca = edits.load_direction(path)
    edit = nodes.NODE_CLASS_MAPPINGS["IDA_WPlusEdit"]
    codes = torch.randn(1, 18, 512, generator=gen)
    named = edit.execute(codes, "directions/ffhq_pca.pt", 1.0, "", -1, -1, 0, "target (official)",
                         "big_smile").result[0]
    saved_before = edit.execute(codes, "directions/ffhq_pca.pt", 2.0, "", -1, -1, 19, "target (official)").result[0]
    inputs = edit.INPUT_TYPES()

    def moved(out):
        return [r for r in range(18) if not torch.equal(out[0, r], codes[0, r])]

    return {"named_rows": moved(named), "named_is_official": torch.equal(named, edits.apply_ganspace(codes, pca, 19,
                                                                                                     20.0, 4, 5)),
            "saved_before_rows": moved(saved_before),
            "saved_before_unchanged": torch.equal(saved_before, edits.apply_ganspace(codes, pca, 19, 2.0, 0, 18)),
            "required": list(inputs["required"]), "optional": _jsonable(inputs.get("optional", {}))}


def wplus_trainer_parity_sd15(work, payload):
    """The W+ adapter's trainer<->node parity, in one process: ComfyUI's UNet of the tiny checkpoint patched by Apply
    W+ Adapter (scale 1, start 0, end 1) against the W+ trainer's forward (``TrainableWPlus``: the diffusers UNet
    with the same weights and the W+ processors, scale 1), on the same latents, timestep and text; CFG chunks
    [uncond, cond] (the unconditional row with a zero W+ code, as the node does) and a conditional-only batch."""
    import comfy.model_management
    import comfy.utils
    import nodes

    import pack_import  # noqa: F401
    from comfyui_idadapter.nodes.arch import wplus as trainer_wplus
    from comfyui_idadapter.training import diffusers_binding
    from comfyui_idadapter.training.wplus_task import TrainableWPlus

    module = _pack_module("wplus")
    _, patches = _pack_modules()
    model, _ = _load_checkpoint(work)
    blocks = patches.unet_layout.unet_transformer_blocks(model.get_model_object("diffusion_model"))
    folder = os.path.join(work, "models", "wplus")
    os.makedirs(folder, exist_ok=True)
    adapter_path = os.path.join(folder, "parity_wplus.safetensors")
    adapter = _random_wplus(module, blocks, 8)
    module.wplus_arch.save_wplus_adapter(module.wplus_arch.WPlusAdapterWeights(adapter, "test"), adapter_path)

    gen = torch.Generator().manual_seed(9)
    codes = torch.randn(1, 18, 512, generator=gen)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    t = torch.tensor([500, 500])
    base = {k: v.detach().float().clone() for k, v in model.model.state_dict().items()}
    loaded = nodes.NODE_CLASS_MAPPINGS["IDA_LoadWPlusAdapter"].execute("parity_wplus.safetensors").result[0]
    patched = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyWPlusAdapter"].execute(model, loaded, codes, 1.0, 0.0,
                                                                         1.0).result[0]
    comfy.model_management.load_models_gpu([patched], force_patch_weights=True)
    dm = patched.model.diffusion_model
    dtype = dm.input_blocks[0][0].weight.dtype
    replaces = patched.model_options["transformer_options"]["patches_replace"]

    def comfyui(rows, cond_or_uncond):
        options = {"patches_replace": replaces, "cond_or_uncond": cond_or_uncond, "sigmas": torch.tensor([1.0])}
        with torch.no_grad():
            return dm(x[rows].to(dtype), timesteps=t[rows], context=text[rows].to(dtype),
                      transformer_options=options).float()

    theirs = {"cfg": comfyui(slice(0, 2), [1, 0]), "cond": comfyui(slice(1, 2), [0])}

    unet = _tiny_diffusers_unet()
    mapping = comfy.utils.unet_to_diffusers(TINY_UNET_CONFIG)
    unet.load_state_dict({d: base["diffusion_model." + name] for d, name in mapping.items()
                          if "diffusion_model." + name in base})
    unet.eval()
    weights = trainer_wplus.load_wplus_adapter(adapter_path)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=text).sample
        # the trainer's forward: codes -> the mapping -> the UNet with the W+ processors; a zero code is the
        # unconditional row, as the trainer's dropout and the node's uncond half
        trainable = TrainableWPlus(unet, weights.adapter).eval()
        installed = sorted(name for name, block in diffusers_binding.transformer_blocks(unet).items()
                           if isinstance(block.attn2.processor, diffusers_binding.WPlusAttnProcessor))
        ours = {"cfg": trainable(x, t, text, torch.cat([torch.zeros_like(codes), codes])),
                "cond": trainable(x[1:], t[1:], text[1:], codes)}
    return {"dtype": str(dtype), "blocks": sorted(blocks), "installed": installed,
            "patched": sorted("_".join(map(str, k)) for k in replaces.get("attn2", {})),
            "adapter_effect": float((ours["cfg"] - plain).abs().max()),
            "uncond_effect": float((ours["cfg"][:1] - plain[:1]).abs().max()),
            "max_diff": {k: float((ours[k] - theirs[k]).abs().max()) for k in ours},
            "close": {k: bool(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-5)) for k in ours}}


def two_identities_add_up(work, payload):
    """Two Apply IDAdapter (weights 0.7 and 0.5, tokens A and B, left and right masks) chained on the tiny checkpoint,
    and likewise two Apply W+ Adapter (codes A and B): at every transformer block, on the activations a probe recorded
    in a plain forward, the residual the chained MODEL's patch adds against the sum of the two single applies'
    residuals, and each single residual outside its mask; the K/V weights of the chained MODEL against base + 0.7 x
    the deltas; the input MODELs keep their own patches."""
    import comfy.model_management
    import nodes

    pack, patches = _pack_modules()
    layout, shared, unet_blocks_arch = patches.unet_layout, patches.shared, _pack_module("arch.unet_blocks")
    wplus = _pack_module("wplus")
    model, base, unet_blocks = _tiny_model(work)
    gen = torch.Generator().manual_seed(21)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    left = torch.zeros(1, 64, 64)
    left[..., :32] = 1
    right = 1 - left
    idadapter = pack.load_cached(os.path.join(work, "models", "idadapter", "tiny.safetensors"))
    embeds = [pack.ida.IDAdapterEmbeds(torch.randn(1, 4, 64, generator=gen), {"l": torch.zeros(768)}, "sd15")
              for _ in range(2)]
    adapter = _random_wplus(wplus, unet_blocks, 22)
    loaded_wplus = wplus.LoadedModel(patches.memory.module_patcher(adapter), adapter.config)
    codes = [torch.randn(1, 18, 512, generator=gen) for _ in range(2)]
    apply_ida = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"].execute
    apply_wplus = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyWPlusAdapter"].execute

    # a plain forward with probes: each block's middle-patch input and each attn2's q, k, v, with their options
    seen_middle, seen_attn2 = {}, {}
    probed = model.clone()

    def middle_probe(h, extra_options):
        seen_middle[unet_blocks_arch.block_name((*extra_options["block"], extra_options["block_index"]))] = (
            h.clone(), dict(extra_options))
        return h

    def attn2_probe(q, k, v, extra_options):
        seen_attn2[unet_blocks_arch.block_name((*extra_options["block"], extra_options["block_index"]))] = (
            q.clone(), k.clone(), v.clone(), dict(extra_options))
        return shared.comfy_attention(extra_options)(q, k, v, extra_options["n_heads"])

    probed.set_model_patch(middle_probe, "middle_patch")
    for name in unet_blocks:
        probed.set_model_attn2_replace(attn2_probe, *layout.block_key(name))
    comfy.model_management.load_models_gpu([probed], force_patch_weights=True)
    given = probed.model_options["transformer_options"]
    with torch.no_grad():
        probed.model.diffusion_model(x, timesteps=torch.tensor([500, 500]), context=text, transformer_options={
            "patches": given["patches"], "patches_replace": given["patches_replace"], "cond_or_uncond": [1, 0],
            "sigmas": torch.tensor([1.0])})

    def middle_residual(patcher, name):
        h, extra_options = seen_middle[name]
        (patch,) = [p for p in patcher.model_options["transformer_options"]["patches"]["middle_patch"]
                    if isinstance(p, patches.idadapter_patch.IDAdapterMiddlePatch)]
        with torch.no_grad():
            return patch(h, extra_options) - h

    def attn2_residual(patcher, name):
        q, k, v, extra_options = seen_attn2[name]
        patch = patcher.model_options["transformer_options"]["patches_replace"]["attn2"][layout.block_key(name)]
        with torch.no_grad():
            return patch(q, k, v, extra_options) - shared.comfy_attention(extra_options)(q, k, v, extra_options["n_heads"])

    def outside(mask, residual, name, seen):
        extra_options = seen[name][-1]
        h = seen[name][0]
        images = shared.images_per_chunk(extra_options, h.shape[0])
        block_mask = shared.BlockMask(mask).for_rows(extra_options, images, h.shape[0], h.shape[1], h)
        return float((residual * (1 - block_mask)).abs().max())

    result = {}
    for method, apply, inputs, residual, seen in (
            ("idadapter", lambda m, i, w, mask: apply_ida(m, idadapter, embeds[i], w, 0.0, 1.0, mask).result[0],
             embeds, middle_residual, seen_middle),
            ("wplus", lambda m, i, w, mask: apply_wplus(m, loaded_wplus, codes[i], w, 0.0, 1.0, mask).result[0],
             codes, attn2_residual, seen_attn2)):
        first = apply(model, 0, 0.7, left)
        both = apply(first, 1, 0.5, right)
        second = apply(model, 1, 0.5, right)
        blocks = {}
        for name in unet_blocks:
            r1, r2, r12 = residual(first, name), residual(second, name), residual(both, name)
            blocks[name] = {"sum_diff": float((r12 - r1 - r2).abs().max()), "r1": float(r1.abs().max()),
                            "r2": float(r2.abs().max()), "r1_outside": outside(left, r1, name, seen),
                            "r2_outside": outside(right, r2, name, seen)}
        comfy.model_management.load_models_gpu([both], force_patch_weights=True)
        state = both.model.state_dict()
        kv_diff = 0.0
        for name, deltas in idadapter.kv_deltas.items():
            for proj, delta in deltas.items():
                key = layout.attn2_weight_key(name, proj)
                expected = base[key] + (0.7 * delta.float() if method == "idadapter" else 0)
                kv_diff = max(kv_diff, float((state[key].float() - expected).abs().max()))
        first_options = first.model_options["transformer_options"]
        result[method] = {
            "blocks": blocks, "kv_diff": kv_diff,
            "input_model_plain": not model.model_options.get("transformer_options", {}).get("patches")
                                 and not model.model_options.get("transformer_options", {}).get("patches_replace"),
            "first_keeps_one_identity": all(
                len(p.identities) == 1 for p in [*first_options.get("patches", {}).get("middle_patch", []),
                                                 *first_options.get("patches_replace", {}).get("attn2", {}).values()]),
        }
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    return result


def attn_masks_checked_at_apply(work, payload):
    """Apply IDAdapter and Apply W+ Adapter on the tiny checkpoint with a NaN attn_mask (the error each raises) and
    with a mask of 1.5 and -0.5 (the range of the mask their patches hold)."""
    import nodes

    pack, patches = _pack_modules()
    wplus = _pack_module("wplus")
    model, _, unet_blocks = _tiny_model(work)
    _, _, idadapter, embeds, loaded_wplus, codes = _inputs_for_both_adapters(work, pack, patches, wplus, unet_blocks,
                                                                             seed=31, wplus_seed=32)
    methods = {
        "idadapter": lambda mask: nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"].execute(
            model, idadapter, embeds, 0.7, 0.0, 1.0, mask).result[0],
        "wplus": lambda mask: nodes.NODE_CLASS_MAPPINGS["IDA_ApplyWPlusAdapter"].execute(
            model, loaded_wplus, codes, 0.8, 0.0, 1.0, mask).result[0],
    }
    result = {}
    for method, apply in methods.items():
        try:
            apply(torch.full((1, 64, 64), float("nan")))
            nan_error = None
        except Exception as error:  # noqa: BLE001  (the type is the result)
            nan_error = {"type": type(error).__name__, "pack_error": isinstance(error, pack.PackError),
                         "message": str(error)}
        options = apply(torch.tensor([1.5, -0.5]).repeat_interleave(32).expand(64, -1)[None]).model_options
        patch_objects = [*options["transformer_options"].get("patches", {}).get("middle_patch", []),
                         *options["transformer_options"].get("patches_replace", {}).get("attn2", {}).values()]
        held = torch.stack([identity.mask.mask for p in patch_objects for identity in p.identities])
        result[method] = {"nan_error": nan_error, "held_min": float(held.min()), "held_max": float(held.max())}
    return result


def attention_options_reach_the_kernel(work, payload):
    """Apply IDAdapter and Apply W+ Adapter on the tiny checkpoint whose transformer blocks ask for float32 attention
    (as SD2.x's config does), with an ``optimized_attention_override`` in the MODEL's transformer options that
    records each call's key length and ``attn_precision``. A forward of each patched MODEL against one of the plain
    MODEL with the same override: the calls only the patched one made are the adapter's own attention, and none of
    the plain MODEL's calls may be missing (a W+ block computes the text attention itself)."""
    import collections

    import comfy.model_management
    import nodes

    pack, patches = _pack_modules()
    wplus = _pack_module("wplus")
    model, _, unet_blocks = _tiny_model(work)
    for module in model.get_model_object("diffusion_model").modules():  # each block and its two attentions
        if hasattr(module, "attn_precision"):
            module.attn_precision = torch.float32
    x, text, idadapter, embeds, loaded_wplus, code = _inputs_for_both_adapters(work, pack, patches, wplus,
                                                                               unet_blocks, seed=23, wplus_seed=24)

    def calls_of(patched):
        seen = []

        def record(func, *args, **kwargs):
            seen.append((int(args[1].shape[1]), str(kwargs.get("attn_precision"))))
            return func(*args, **kwargs)

        options = patched.model_options["transformer_options"]
        comfy.model_management.load_models_gpu([patched], force_patch_weights=True)
        with torch.no_grad():
            patched.model.diffusion_model(x, timesteps=torch.tensor([500, 500]), context=text, transformer_options={
                "patches": options.get("patches", {}), "patches_replace": options.get("patches_replace", {}),
                "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0]), "optimized_attention_override": record})
        return collections.Counter(seen)

    plain = calls_of(model)
    result = {"plain": sorted(plain)}
    for method, patched in (
            ("idadapter", nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"].execute(model, idadapter, embeds, 0.7, 0.0,
                                                                                  1.0).result[0]),
            ("wplus", nodes.NODE_CLASS_MAPPINGS["IDA_ApplyWPlusAdapter"].execute(model, loaded_wplus, code, 0.8, 0.0,
                                                                                 1.0).result[0])):
        calls = calls_of(patched)
        result[method] = {"added": sorted((calls - plain).elements()), "lost": sorted((plain - calls).elements())}
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    return result

"""The models an AdaFace run uses: the frozen SD1.5 student and Arc2Face teacher, and the inverter it starts from
(a copy of the base's CLIP text encoder, or an adaface/1 file); loaded, or for --preset tiny built."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..nodes.arch import adaface as ada
from ..nodes.errors import ConfigError
from .adaface_config import AdaFaceTrainConfig
from .base_model import load_base_model

DEFAULT_LAYER_WEIGHTS = [[1.0], [2.0], [4.0]]  # the official initial hidden_state_layer_weights


@dataclass
class AdaFaceModels:
    """The frozen models of a run and the inverter it starts from."""

    tokenizer: object  # the student's (SD1.5) tokenizer
    text_encoder: nn.Module  # SD1.5's CLIP text encoder (transformers)
    unet: nn.Module  # SD1.5's UNet
    noise_scheduler: object
    vae: nn.Module  # the composition stage's photos, and validation images
    teacher_unet: nn.Module  # Arc2Face's UNet
    arc2face: ada.CLIPTextTransformer  # Arc2Face's ID encoder
    inverter: ada.CLIPTextTransformer  # the inverter's starting weights
    hidden_state_layer_weights: torch.Tensor
    analyzer: object  # insightface, for the dataset's faces


def inverter_from_text_encoder(text_encoder) -> ada.CLIPTextTransformer:
    """The inverter's starting point: a copy of a transformers CLIP text encoder (the base's, CLIP ViT-L/14)."""
    cfg = text_encoder.config
    if cfg.hidden_act != "quick_gelu":
        raise ConfigError(f"the base's text encoder uses {cfg.hidden_act}; the inverter is CLIP ViT-L/14's "
                          "architecture (quick_gelu): use an SD1.5 base")
    model = ada.CLIPTextTransformer(ada.TextModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads, max_positions=cfg.max_position_embeddings))
    prefix = "text_model."  # transformers 4 writes it, transformers 5 does not
    state = {k if k.startswith(prefix) else prefix + k: v.detach().float().clone()
             for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    model.load_state_dict(state)
    return model


def load_models(config: AdaFaceTrainConfig) -> tuple[AdaFaceModels, str, str]:
    """Loads (or, for --preset tiny, builds) every model; returns them, the dataset folder and the held-out one."""
    from ..nodes.face import insightface_backend

    if config.preset == "tiny":
        from . import tiny

        # held out: one photo each of two other people
        assets, pack, data_dir, heldout_dir = tiny.face_assets(config, 64, 2, 1,
                                                               heldout_first_identity=config.synthetic_identities)
        tokenizer = tiny.tiny_tokenizer(os.path.join(assets, "tokenizer"))
        unet = tiny.tiny_unet()
        if config.inverter_init:  # e.g. a tiny face-stage export, for a tiny composition run
            start = ada.load_adaface(config.inverter_init)
            inverter, layer_weights = start.inverter, start.hidden_state_layer_weights
        else:
            inverter, layer_weights = tiny.tiny_clip_l(layers=2, seed=2), torch.tensor(DEFAULT_LAYER_WEIGHTS)
        models = AdaFaceModels(
            tokenizer=tokenizer, text_encoder=tiny.tiny_text_encoder(len(tokenizer)), unet=unet,
            noise_scheduler=tiny.tiny_scheduler("epsilon"), vae=tiny.tiny_vae(), teacher_unet=tiny.fine_tuned(unet),
            arc2face=tiny.tiny_clip_l(layers=1, seed=1), inverter=inverter,
            hidden_state_layer_weights=layer_weights,
            analyzer=insightface_backend.load_analyzer(pack, "CPU", 640))
        return models, data_dir, heldout_dir

    from diffusers import UNet2DConditionModel

    from ..nodes.arch.arc2face import load_arc2face_encoder

    teacher_folder = os.path.join(config.arc2face, "arc2face")  # checked first: the base takes a while to load
    if not os.path.isfile(os.path.join(teacher_folder, "config.json")):
        raise ConfigError(f"--arc2face {config.arc2face!r} has no arc2face/config.json: expected the folder of "
                          "FoivosPar/Arc2Face holding arc2face/ (the UNet) and encoder/ (the ID encoder)")
    base = load_base_model(config.base_model)
    if "text_encoder_2" in base or base["unet"].config.cross_attention_dim != 768:
        raise ConfigError(f"--base_model {config.base_model!r} is not an SD1.5 model; AdaFace's tokens are SD1.5's "
                          "(CLIP-L, 768 wide)")
    if config.inverter_init:
        start = ada.load_adaface(config.inverter_init)
        inverter, layer_weights = start.inverter, start.hidden_state_layer_weights
    else:
        inverter, layer_weights = inverter_from_text_encoder(base["text_encoder"]), torch.tensor(DEFAULT_LAYER_WEIGHTS)
    models = AdaFaceModels(
        tokenizer=base["tokenizer"], text_encoder=base["text_encoder"], unet=base["unet"],
        noise_scheduler=base["noise_scheduler"], vae=base["vae"],
        teacher_unet=UNet2DConditionModel.from_pretrained(teacher_folder),
        arc2face=load_arc2face_encoder(os.path.join(config.arc2face, "encoder")), inverter=inverter,
        hidden_state_layer_weights=layer_weights,
        analyzer=insightface_backend.load_analyzer(insightface_backend.check_pack_folder(config.insightface_pack),
                                                   "auto", 640))
    return models, config.dataset, config.heldout_dataset

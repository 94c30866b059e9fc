"""The models a W+ adapter run uses, loaded (or, for --preset tiny, built), and the cache of its photos' W+ codes
(e4e's, computed once per photo: ``<cache_dir>/wplus_codes.safetensors``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..nodes.arch import e4e as e4e_arch
from ..nodes.arch import wplus as wp
from ..nodes.errors import ConfigError
from . import data as dataset
from .base_model import load_base_model
from .wplus_config import WPlusTrainConfig

CODE_CACHE_FORMAT = "wplus_codes/1"
CODE_BATCH = 16  # faces per e4e call while filling the code cache


@dataclass
class WPlusModels:
    """The frozen models of a run. ``encoder`` makes W+ codes from aligned faces (a callable returning e4e's
    ``WPlusEncoder``, loaded only when some code is not cached yet); ``encoder_id`` names it in the code cache."""

    tokenizer: object
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: object
    encoder: object
    encoder_id: str
    analyzer: object


def load_models(config: WPlusTrainConfig) -> tuple[WPlusModels, str, str]:
    """Loads (or, for --preset tiny, builds) every model; returns them, the dataset folder and the held-out one."""
    from ..nodes.face import insightface_backend

    if config.preset == "tiny":
        from . import tiny

        # held out: two new photos each of two of the people (six synthetic people teach no mapping that carries to
        # unseen ones)
        assets, pack, data_dir, heldout_dir = tiny.face_assets(config, 64, 2, 2)
        tokenizer = tiny.tiny_tokenizer(os.path.join(assets, "tokenizer"))
        text_encoder, vae = tiny.tiny_text_encoder(len(tokenizer)), tiny.tiny_vae()
        # v-prediction, as the other tiny presets: the condition then counts at every noise level, so a short run
        # shows what W+ carries (an SD2.x base trains the same way)
        noise_scheduler = tiny.tiny_scheduler()
        unet = tiny.base_unet(assets, vae, text_encoder, tokenizer, noise_scheduler, data_dir, config.tiny_base_steps,
                              config.seed)
        models = WPlusModels(tokenizer, text_encoder, vae, unet, noise_scheduler, lambda: tiny.TinyWPlusEncoder(),
                             "tiny-e4e", insightface_backend.load_analyzer(pack, "CPU", 640))
        return models, data_dir, heldout_dir

    e4e_path = os.path.abspath(config.e4e)
    base = load_base_model(config.base_model)
    if "text_encoder_2" in base:
        raise ConfigError(f"--base_model {config.base_model!r} is an SDXL model; the W+ adapter is trained for SD1.5 "
                          "(SD2.x works too): its UNet takes the text alone")
    models = WPlusModels(
        base["tokenizer"], base["text_encoder"], base["vae"], base["unet"], base["noise_scheduler"],
        lambda: e4e_arch.WPlusEncoder(e4e_arch.load_e4e_file(e4e_path)),
        f"{e4e_path}:{dataset.FaceCache.stamp(e4e_path)}",
        insightface_backend.load_analyzer(insightface_backend.check_pack_folder(config.insightface_pack), "auto", 640))
    return models, config.dataset, config.heldout_dataset


# ---- W+ codes, computed once per photo


def _read_code_cache(path: str, encoder_id: str) -> tuple[dict[str, tuple[str, torch.Tensor]], str | None]:
    """{photo path: (stamp, code [18, 512])} from a code cache file, and why it was not used (None: it was)."""
    from safetensors import safe_open

    if not os.path.lexists(path):
        return {}, None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CODE_CACHE_FORMAT:
                return {}, f"{path} is not a {CODE_CACHE_FORMAT} file: every code is computed again"
            if meta.get("encoder") != encoder_id:
                return {}, f"{path} holds another encoder's codes: every code is computed again"
            index, codes = json.loads(meta["index"]), f.get_tensor("codes")
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (wp.W_ROWS, wp.W_DIM) or not torch.isfinite(codes).all():
            raise ValueError(f"codes of shape {tuple(codes.shape)}")
        entries = {}
        for key, (stamp, row) in index.items():
            if not isinstance(stamp, str) or not isinstance(row, int) or not 0 <= row < len(codes):
                raise ValueError(f"bad index entry for {key!r}")
            entries[key] = (stamp, codes[row])
        return entries, None
    except Exception as exc:  # truncated, not safetensors, a broken index: compute again
        return {}, f"corrupt W+ code cache {path} ({type(exc).__name__}), rebuilt"


def cached_codes(photos: list, path: str, encoder_id: str, make_encoder, device, log=print) -> torch.Tensor:
    """W+ codes [N, 18, 512] (float32, CPU) of ``photos`` (FaceImage): read from the cache file at ``path`` where it
    holds this encoder's code of this version of the file, otherwise e4e of the aligned face, then written back."""
    entries, problem = _read_code_cache(path, encoder_id)
    if problem:
        log(problem)
    stamps = [dataset.FaceCache.stamp(photo.path) for photo in photos]
    keys = [os.path.abspath(photo.path) for photo in photos]
    missing = [i for i, (key, stamp) in enumerate(zip(keys, stamps)) if entries.get(key, ("",))[0] != stamp]
    if missing:
        log(f"W+ codes: encoding {len(missing)} face(s) with e4e (cached for later runs in {path})")
        encoder = make_encoder().to(device).eval()
        with torch.no_grad():
            for start in range(0, len(missing), CODE_BATCH):
                chunk = missing[start:start + CODE_BATCH]
                faces = torch.stack([e4e_arch.align_for_e4e(dataset.load_rgb_tensor(photos[i].path), photos[i].landmarks) for i in chunk])
                for i, code in zip(chunk, encoder(faces.to(device)).float().cpu()):
                    entries[keys[i]] = (stamps[i], code)
        del encoder
        from ..nodes.arch.files import write_safetensors

        names = sorted(entries)
        write_safetensors({"codes": torch.stack([entries[k][1] for k in names])}, path,
                          {"format": CODE_CACHE_FORMAT, "encoder": encoder_id,
                           "index": json.dumps({k: [entries[k][0], row] for row, k in enumerate(names)})})
    return torch.stack([entries[key][1] for key in keys])

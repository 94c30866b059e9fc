"""W+ adapter nodes: Load e4e Encoder, W+ Encode, W+ Edit, W+ Interpolate, Save / Load W+, Load W+ Adapter,
Apply W+ Adapter.

A face goes into StyleGAN's W+ space (e4e), can be edited there with StyleGAN directions (age, smile, pose, ...),
and conditions the UNet through the W+ adapter's residual cross-attention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths
import torch
from comfy_api.latest import io

from .arch import e4e as e4e_arch
from .arch import wplus as wplus_arch
from .arch import wplus_edits
from .arch.face_embeds import FaceEmbeds as FaceEmbedsValue
from .arch.face_embeds import check_made_from, largest_face_of_each_image
from .arch.output_files import PREFIX_TOOLTIP, save_to_new_file
from .errors import ConfigError, PackError
from .face import insightface_backend
from .face.images import rgb_images
from .face_nodes import CATEGORY, FaceEmbeds, InsightFace
from .patches.memory import module_patcher, run_loaded
from .patches.shared import check_attn_mask
from .patches.unet_layout import unet_block_weights, unet_transformer_blocks
from .patches.wplus_patch import WPlusAttn2Replace, add_wplus
from .resident import ResidentFile
from .shared_inputs import attn_mask_input, block_weight_inputs

E4EType = io.Custom("E4E")
WPlusType = io.Custom("WPLUS")
WPlusAdapterType = io.Custom("WPLUS_ADAPTER")
DIRECTIONS = "directions"  # models/wplus/directions/
NO_DIRECTION = "(none: put direction files into models/wplus/directions/)"


@dataclass
class LoadedModel:
    """A file's module owned by a ComfyUI model patcher (loaded and offloaded by the memory manager)."""

    patcher: object
    config: object = None

    @property
    def module(self):
        return self.patcher.model


_resident = {"e4e": ResidentFile(), "adapter": ResidentFile()}


def load_cached(kind: str, path: str, load) -> LoadedModel:
    """One resident file per kind (e4e, adapter): another Load node of that kind reloads its own."""
    return _resident[kind].get((path,), lambda: load(path))


def _wplus_files(ending: tuple[str, ...]) -> list[str]:
    return [f for f in folder_paths.get_filename_list("wplus")
            if f.lower().endswith(ending) and not f.replace(os.sep, "/").startswith(DIRECTIONS + "/")]


def _direction_files() -> list[str]:
    found = [f for f in folder_paths.get_filename_list("wplus") if f.replace(os.sep, "/").startswith(DIRECTIONS + "/")]
    return found or [NO_DIRECTION]


class LoadE4EEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_LoadE4EEncoder",
            display_name="Load e4e Encoder",
            category=CATEGORY,
            description="Loads the e4e encoder (StyleGAN2 FFHQ W+) from models/wplus/: the official "
            "e4e_ffhq_encode.pt (read tensors-only; its StyleGAN decoder is not used) or an e4e/1 safetensors.",
            inputs=[io.Combo.Input("file", options=_wplus_files((".pt", ".safetensors")),
                                   tooltip="e4e_ffhq_encode.pt or an e4e/1 .safetensors")],
            outputs=[E4EType.Output()],
        )

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("wplus", file)

        def load(path):
            return LoadedModel(module_patcher(e4e_arch.WPlusEncoder(e4e_arch.load_e4e_file(path)).eval()))

        return io.NodeOutput(load_cached("e4e", path, load))


class WPlusEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_WPlusEncode",
            display_name="W+ Encode",
            category=CATEGORY,
            description="Each image's largest face, FFHQ-aligned from its 5 landmarks at 256x256, encoded by e4e "
            "into a W+ code [18, 512]. The official pipeline also whitens the background and clothes with a face "
            "parser; this keeps the aligned crop as it is (no parser), so busy backgrounds leak into the code.",
            inputs=[
                E4EType.Input("e4e"),
                io.Image.Input("image", tooltip="one face per image (the largest is used)"),
                InsightFace.Input("insightface", optional=True, tooltip="detects the faces and their landmarks"),
                FaceEmbeds.Input("face_embeds", optional=True,
                                 tooltip="or: Face Embed's output for these images (its landmarks are used)"),
            ],
            outputs=[WPlusType.Output(), io.Image.Output("aligned")],
        )

    @classmethod
    def execute(cls, e4e, image, insightface=None, face_embeds=None) -> io.NodeOutput:
        if face_embeds is None and insightface is None:
            raise PackError("connect insightface (Load InsightFace) or face_embeds (Face Embed) to W+ Encode: the "
                            "alignment needs each face's landmarks")
        images = rgb_images(image)
        if face_embeds is None:
            face_embeds, _ = insightface_backend.embed_faces(insightface, images, "largest", on_no_face="error")
        if not isinstance(face_embeds, FaceEmbedsValue):
            raise PackError("face_embeds must come from Face Embed (or Load Face Embeds)")
        check_made_from(face_embeds, images, "W+ Encode")
        faces = largest_face_of_each_image(face_embeds, images.shape[0], "W+ Encode aligns each image's face by its "
                                           "landmarks")
        aligned = torch.stack([e4e_arch.align_for_e4e(images[index].movedim(-1, 0), face_embeds.landmarks[face])
                               for index, face in enumerate(faces)])
        codes = run_loaded(e4e.patcher, aligned).float().cpu()
        return io.NodeOutput(codes, aligned.movedim(1, -1))


class WPlusEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_WPlusEdit",
            display_name="W+ Edit",
            category=CATEGORY,
            description="Moves W+ codes along a StyleGAN direction from models/wplus/directions/: InterFaceGAN "
            "[1, 512] .pt (all 18 rows), latent-direction [18, 512] .npy (rows 0-7, as the official code), or "
            "GANSpace ffhq_pca.pt (a named edit of GANSpace's table, or a component over a row range).",
            inputs=[
                WPlusType.Input("wplus"),
                io.Combo.Input("direction", options=_direction_files()),
                io.Float.Input("strength", default=1.0, min=-20.0, max=20.0, step=0.1,
                               tooltip="InterFaceGAN / latent directions: the step (official range -4..4). GANSpace "
                               "named edit: a multiple of the edit's official strength (1 = official, -1 = the "
                               "other way). GANSpace custom: the target coordinate in standard deviations "
                               "(official), or the step (relative)"),
                io.String.Input("sweep", default="",
                                tooltip="several strengths, e.g. '-3, -1, 1, 3': one code per strength and input "
                                "code (a batch), instead of 'strength'"),
                io.Int.Input("start_layer", default=-1, min=-1, max=17,
                             tooltip="-1: the direction's (or named edit's) own rows"),
                io.Int.Input("end_layer", default=-1, min=-1, max=18,
                             tooltip="exclusive; -1: the direction's (or named edit's) own"),
                io.Int.Input("ganspace_component", default=0, min=0, max=511,
                             tooltip="GANSpace with ganspace_edit 'custom' only"),
                io.Combo.Input("ganspace_mode", options=["target (official)", "relative"],
                               tooltip="GANSpace: strength is the target coordinate (official) or a step"),
                # optional and last: workflows saved before it keep their widget values and mean what they meant
                io.Combo.Input("ganspace_edit", options=[wplus_edits.CUSTOM_EDIT, *sorted(wplus_edits.GANSPACE_EDITS)],
                               default=wplus_edits.CUSTOM_EDIT, optional=True,
                               tooltip="GANSpace ffhq_pca.pt only: a named edit of GANSpace's table, applied as e4e "
                               "does (e.g. big_smile: component 19 on row 4, target 20 standard deviations); "
                               "'custom': ganspace_component over start_layer..end_layer (all rows by default)"),
            ],
            outputs=[WPlusType.Output()],
        )

    @classmethod
    def execute(cls, wplus, direction, strength, sweep, start_layer, end_layer, ganspace_component,
                ganspace_mode, ganspace_edit=wplus_edits.CUSTOM_EDIT) -> io.NodeOutput:
        if direction == NO_DIRECTION:
            raise ConfigError("no direction files: put InterFaceGAN .pt, latent-direction .npy or GANSpace "
                              "ffhq_pca.pt files into models/wplus/directions/")
        loaded = wplus_edits.load_direction(folder_paths.get_full_path_or_raise("wplus", direction))
        strengths = _strengths(sweep) or [strength]
        codes = wplus_edits.check_wplus(wplus)
        codes = codes if codes.ndim == 3 else codes[None]
        start, end = (None if start_layer < 0 else start_layer), (None if end_layer < 0 else end_layer)
        relative = ganspace_mode == "relative"
        edited = []
        for value in strengths:
            if ganspace_edit != wplus_edits.CUSTOM_EDIT:
                edited.append(wplus_edits.apply_named_ganspace(codes, loaded, ganspace_edit, value, start, end,
                                                               relative))
            elif isinstance(loaded, wplus_edits.GanSpace):
                edited.append(wplus_edits.apply_ganspace(codes, loaded, ganspace_component, value,
                                                         0 if start is None else start,
                                                         wplus_arch.W_ROWS if end is None else end, relative))
            else:
                edited.append(wplus_edits.apply_direction(codes, loaded, value, start, end))
        return io.NodeOutput(torch.cat(edited))


def _strengths(text: str) -> list[float]:
    parts = [p for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        return [float(p) for p in parts]
    except ValueError as exc:
        raise ConfigError(f"sweep {text!r} is not a comma-separated list of numbers, e.g. '-3, -1, 1, 3'") from exc


class WPlusInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_WPlusInterpolate",
            display_name="W+ Interpolate",
            category=CATEGORY,
            description="(1 - t) * a + t * b: two identities mixed in W+ (t outside 0..1 extrapolates).",
            inputs=[WPlusType.Input("a"), WPlusType.Input("b"),
                    io.Float.Input("t", default=0.5, min=-1.0, max=2.0, step=0.05)],
            outputs=[WPlusType.Output()],
        )

    @classmethod
    def execute(cls, a, b, t) -> io.NodeOutput:
        return io.NodeOutput(wplus_edits.interpolate(a, b, t))


class SaveWPlus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_SaveWPlus",
            display_name="Save W+",
            category=CATEGORY,
            description="Writes W+ codes as safetensors (wplus-code/1) under the output folder (wplus/ by default).",
            inputs=[WPlusType.Input("wplus"),
                    io.String.Input("filename_prefix", default="wplus/face", tooltip=PREFIX_TOOLTIP)],
            outputs=[io.String.Output("path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, wplus, filename_prefix) -> io.NodeOutput:
        path = save_to_new_file(folder_paths.get_output_directory(), filename_prefix,
                                lambda path: wplus_edits.save_wplus_code(wplus, path, replace=False))
        return io.NodeOutput(path)


class LoadWPlus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_LoadWPlus",
            display_name="Load W+",
            category=CATEGORY,
            description="Reads W+ codes (wplus-code/1, or the official test_data .pth) from output/wplus/ (where "
            "Save W+ writes) or models/wplus_codes/.",
            inputs=[io.Combo.Input("file", options=folder_paths.get_filename_list("wplus_codes") or ["(none)"])],
            outputs=[WPlusType.Output()],
        )

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        return io.NodeOutput(wplus_edits.load_wplus_code(folder_paths.get_full_path_or_raise("wplus_codes", file)))


class LoadWPlusAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_LoadWPlusAdapter",
            display_name="Load W+ Adapter",
            category=CATEGORY,
            description="Loads W+ adapter weights from models/wplus/: ours (wplus/1 safetensors) or the official "
            "wplus_adapter.bin / wplus_adapter_stage1.bin (read tensors-only).",
            inputs=[io.Combo.Input("file", options=_wplus_files((".bin", ".safetensors")))],
            outputs=[WPlusAdapterType.Output()],
        )

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("wplus", file)

        def load(path):
            weights = wplus_arch.load_wplus_file(path)
            return LoadedModel(module_patcher(weights.adapter), weights.config)

        return io.NodeOutput(load_cached("adapter", path, load))


class ApplyWPlusAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_ApplyWPlusAdapter",
            display_name="Apply W+ Adapter",
            category=CATEGORY,
            description="Adds the W+ adapter's residual cross-attention to every cross-attention layer: the text "
            "attention (or another pack's patch installed there before) plus scale x attention over the W+ tokens; "
            "the unconditional CFG half gets a zero W+'s tokens, as the official pipeline. Chain one per face, each "
            "with its attn_mask, for several people in one image: their residuals are computed from the same text "
            "attention and summed.",
            inputs=[
                io.Model.Input("model"),
                WPlusAdapterType.Input("wplus_adapter"),
                WPlusType.Input("wplus", tooltip="one code, or one per latent of the batch"),
                io.Float.Input("scale", default=1.0, min=-1.0, max=3.0, step=0.05, tooltip="alpha; 0 = unchanged"),
                io.Float.Input("start_percent", default=0.2, min=0.0, max=1.0, step=0.001,
                               tooltip="the official delayed start: off for the first 20 % of the steps"),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                attn_mask_input("the face"),
                *block_weight_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, wplus_adapter, wplus, scale, start_percent, end_percent, attn_mask=None,
                block_preset="paper", block_weights="") -> io.NodeOutput:
        if start_percent > end_percent:
            raise PackError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
        codes = wplus_edits.check_wplus(wplus)
        attn_mask = check_attn_mask(attn_mask)
        config = wplus_adapter.config
        unet = model.get_model_object("diffusion_model")
        blocks = unet_transformer_blocks(unet)
        missing = sorted(set(config.blocks) - set(blocks))
        if missing or any(blocks[n].channels != s.channels or blocks[n].context_dim != s.context_dim
                          for n, s in config.blocks.items() if n in blocks):
            raise PackError(f"this W+ adapter was made for a {config.family} UNet (blocks {sorted(config.blocks)[:3]}..., "
                            f"context {config.context_dim}); the MODEL's blocks differ"
                            + (f" (it has no {missing[:3]})" if missing else "") + ": use an SD1.5 checkpoint")
        per_block = unet_block_weights(unet, config.family, config.blocks, block_preset, block_weights)
        patched = model.clone()
        if scale == 0:
            return io.NodeOutput(patched)
        adapter = wplus_adapter.module
        with torch.no_grad():
            tokens, uncond = adapter.tokens(codes.float().cpu()), adapter.uncond_tokens(codes.float().cpu()[:1])
        sampling = model.get_model_object("model_sampling")
        for name in config.blocks:
            if per_block[name] == 0:  # no patch: the block runs whatever was installed there before
                continue
            add_wplus(patched, WPlusAttn2Replace(
                wplus_adapter.patcher, name, tokens, uncond, scale * per_block[name],
                sigma_start=sampling.percent_to_sigma(start_percent), sigma_end=sampling.percent_to_sigma(end_percent),
                mask=attn_mask))
        return io.NodeOutput(patched)


WPLUS_NODES = [LoadE4EEncoder, WPlusEncode, WPlusEdit, WPlusInterpolate, SaveWPlus, LoadWPlus, LoadWPlusAdapter,
               ApplyWPlusAdapter]

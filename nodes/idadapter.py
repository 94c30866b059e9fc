"""IDAdapter nodes: Load IDAdapter, IDAdapter MFF Embed, Apply IDAdapter, IDAdapter Text Encode."""

from __future__ import annotations

from dataclasses import dataclass, field

import folder_paths
import torch
from comfy_api.latest import io

from .arch import idadapter as ida
from .arch.face_embeds import FaceEmbeds as FaceEmbedsValue
from .arch.face_embeds import check_made_from, largest_face_of_each_image
from .errors import PackError
from .face import insightface_backend
from .face.images import rgb_images
from .face_nodes import CATEGORY, FaceEmbeds, InsightFace
from .patches.idadapter_patch import IDAdapterMiddlePatch, adapter_patcher, add_idadapter
from .patches.identity_words import IdentityWord, tokenize_with_identities
from .patches.shared import check_attn_mask
from .patches.unet_layout import unet_block_weights, unet_transformer_blocks
from .resident import ResidentFile
from .shared_inputs import IdentityWordsType, attn_mask_input, block_weight_inputs, chained_words, identity_words_input

IDAdapterType = io.Custom("IDADAPTER")
IDAdapterEmbedsType = io.Custom("IDADAPTER_EMBEDS")


@dataclass
class LoadedIDAdapter(ida.IDAdapterWeights):
    """IDADAPTER: an idadapter/1 file's weights and the ComfyUI model patcher that owns their gated-attention
    modules (:func:`adapter_patcher`).

    Made and dropped together: ComfyUI's memory manager can only unload modules whose patcher is alive, so the
    patcher must live as long as the modules it may have put on the GPU.
    """

    patcher: object = field(kw_only=True)  # keyword-only: it follows the base class's defaulted fields


_resident = ResidentFile()


def load_cached(path: str) -> LoadedIDAdapter:
    def load():
        weights = ida.load_idadapter(path)
        return LoadedIDAdapter(weights.adapter, weights.kv_deltas, weights.recognizer,
                               patcher=adapter_patcher(weights.adapter))

    return _resident.get((path,), load)


class LoadIDAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_LoadIDAdapter",
            display_name="Load IDAdapter",
            category=CATEGORY,
            description="Loads IDAdapter weights (idadapter/1 safetensors) from models/idadapter/.",
            inputs=[io.Combo.Input("file", options=folder_paths.get_filename_list("idadapter"))],
            outputs=[IDAdapterType.Output()],
        )

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        return io.NodeOutput(load_cached(folder_paths.get_full_path_or_raise("idadapter", file)))


class IDAdapterMFFEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_IDAdapterMFFEmbed",
            display_name="IDAdapter MFF Embed",
            category=CATEGORY,
            description="Mixed facial features of 1..K reference photos (the first N; fewer are copied up to N, as "
            "the paper does at inference) -> the identity's vision tokens and text token. Adapters trained on face "
            "crops get each photo's face, cropped as in training.",
            inputs=[
                IDAdapterType.Input("idadapter"),
                io.ClipVision.Input("clip_vision"),
                io.Image.Input("images", tooltip="1..K portraits of one person"),
                io.Int.Input("num_images", default=0, min=0, max=16,
                             tooltip="N references fed to the MFF; 0 = the N the adapter was trained with"),
                io.Boolean.Input("augment", default=False,
                                 tooltip="with fewer than N photos: off fills up to N with plain copies, as the paper "
                                 "does at inference; on fills with flipped/rotated/colour-jittered copies (as the "
                                 "trainer fills identities with few photos)"),
                # control_after_generate=False: no "control after generate" widget, so the seed stays as set and
                # a result can be reproduced. ComfyUI 0.3.64 takes only a bool here and its frontend starts every
                # control widget at "randomize" (which an INT named "seed" gets unless this says False); 0.38
                # also accepts io.ControlAfterGenerate.fixed, but one layout for every version keeps saved
                # widgets_values valid everywhere. Workflows saved with a control value still load (the
                # frontend drops the extra value).
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="seed of the augmentation; fixed, so the same inputs give the same tokens"),
                FaceEmbeds.Input("face_embeds", optional=True, tooltip="ArcFace vectors of the references"),
                InsightFace.Input("insightface", optional=True, tooltip="or: compute them from the images"),
            ],
            outputs=[IDAdapterEmbedsType.Output()],
        )

    @classmethod
    def execute(cls, idadapter, clip_vision, images, num_images, augment, seed, face_embeds=None,
                insightface=None) -> io.NodeOutput:
        if face_embeds is None and insightface is None:
            raise PackError("connect face_embeds (from Face Embed) or insightface (Load InsightFace) to MFF Embed")
        count = num_images or idadapter.config.num_images
        images = rgb_images(images)
        if face_embeds is not None:
            if not isinstance(face_embeds, FaceEmbedsValue):
                raise PackError("face_embeds must come from Face Embed (or Load Face Embeds)")
            check_made_from(face_embeds, images, "MFF Embed")
        refs = images[:count]  # CLIP and ArcFace both take the first N photos
        detected = None
        if insightface is not None:
            detected, _ = insightface_backend.embed_faces(insightface, refs, "largest", on_no_face="error")
        if face_embeds is None:
            face_embeds = detected
        if len(face_embeds) == 0:
            raise PackError("face_embeds holds no face: the references need a detectable face")
        ida.check_same_recognizer(idadapter.recognizer, face_embeds.recognizer)
        # per-photo faces describe these photos: keep those of the first N; averaged vectors are used as given
        arcface = face_embeds.embeds[face_embeds.image_index < count] if face_embeds.has_geometry else \
            face_embeds.embeds
        margin = idadapter.config.face_crop_margin
        boxes = [None] * len(refs)
        if margin is not None:  # the adapter was trained on face crops: find each photo's face
            faces = detected if detected is not None else face_embeds
            boxes = faces.boxes[largest_face_of_each_image(faces, len(refs), "this IDAdapter shows CLIP a crop "
                                                           "around each reference's face (connect insightface to "
                                                           "MFF Embed, or use photos with a detectable face)")]
        crops = torch.stack([ida.reference_crop(ref.movedim(-1, 0), box, margin, clip_vision.image_size)
                             for ref, box in zip(refs, boxes)])
        crops = ida.fill_references(crops, count, seed, augment)
        out = clip_vision.encode_image(crops.movedim(1, -1), crop=True)
        embeds = ida.embed_references(
            idadapter.adapter, out["penultimate_hidden_states"], out["last_hidden_state"][:, 0], arcface
        )
        return io.NodeOutput(embeds)


class ApplyIDAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_ApplyIDAdapter",
            display_name="Apply IDAdapter",
            category=CATEGORY,
            description="Adds IDAdapter's gated self-attention to every transformer block and its cross-attention "
            "K/V to the MODEL. Chain one per person, each with its attn_mask, for several identities in one image: "
            "their residuals are computed from the same activations and summed.",
            inputs=[
                io.Model.Input("model"),
                IDAdapterType.Input("idadapter"),
                IDAdapterEmbedsType.Input("embeds"),
                io.Float.Input("weight", default=1.0, min=-1.0, max=3.0, step=0.05,
                               tooltip="beta: scales the gated attention and the K/V deltas; 0 = the MODEL unchanged. "
                               "With several applies of one adapter file, its K/V deltas are added once, at the first "
                               "apply's weight (and block weights): they belong to the file, not to an identity"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                attn_mask_input("the identity"),
                *block_weight_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, idadapter, embeds, weight, start_percent, end_percent, attn_mask=None,
                block_preset="paper", block_weights="") -> io.NodeOutput:
        if embeds.family != idadapter.config.family or embeds.tokens.shape[-1] != idadapter.config.embed_dim:
            raise PackError(
                f"these IDADAPTER_EMBEDS come from a {embeds.family} IDAdapter; the IDADAPTER is "
                f"{idadapter.config.family}: use the same IDAdapter for MFF Embed and Apply"
            )
        if start_percent > end_percent:
            raise PackError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
        attn_mask = check_attn_mask(attn_mask)
        unet = model.get_model_object("diffusion_model")
        ida.check_unet_compatible(idadapter.config, unet_transformer_blocks(unet))
        per_block = unet_block_weights(unet, idadapter.config.family, idadapter.adapter.adapters,
                                       block_preset, block_weights)
        patched = model.clone()
        if weight == 0:
            return io.NodeOutput(patched)
        sampling = model.get_model_object("model_sampling")
        patch = IDAdapterMiddlePatch(
            idadapter.patcher,
            embeds.tokens,
            weight,
            sigma_start=sampling.percent_to_sigma(start_percent),
            sigma_end=sampling.percent_to_sigma(end_percent),
            mask=attn_mask,
            block_weights=per_block,
        )
        add_idadapter(patched, patch, idadapter.kv_deltas, weight, per_block)
        return io.NodeOutput(patched)


class IDAdapterTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_IDAdapterTextEncode",
            display_name="IDAdapter Text Encode",
            category=CATEGORY,
            description="Encodes a prompt whose identifier word (default 'sks') becomes the identity text token; "
            "'<class noun> is <identifier>' is appended as in training. More people: identity_words.",
            inputs=[
                io.Clip.Input("clip"),
                IDAdapterEmbedsType.Input("embeds"),
                io.String.Input("text", multiline=True, default="a photo of sks, smiling, in a garden"),
                io.String.Input("identifier", default=ida.DEFAULT_IDENTIFIER),
                io.String.Input("class_noun", default="person", tooltip="woman, man, person, ..."),
                io.Boolean.Input("append_class_phrase", default=True,
                                 tooltip="append ', <class noun> is <identifier>' as the paper's training prompts do "
                                 "(for every IDAdapter identity word too)"),
                identity_words_input(),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, embeds, text, identifier, class_noun, append_class_phrase,
                identity_words=None) -> io.NodeOutput:
        words = [identity_word(embeds, identifier, class_noun), *(identity_words or [])]
        if append_class_phrase:
            for word in words:
                if word.class_noun:
                    text = ida.identity_prompt(text, word.class_noun, word.word)
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokenize_with_identities(clip, text, words)))


def identity_word(embeds, identifier: str, class_noun: str) -> IdentityWord:
    """The identity text token E_c of ``embeds`` (one vector per text encoder) on ``identifier``."""
    return IdentityWord(ida.check_identifier(identifier.strip()),
                        {key: vector.detach().float().reshape(1, -1) for key, vector in embeds.text.items()},
                        "IDAdapter", class_noun=class_noun.strip())


class IDAdapterIdentityWord(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_IDAdapterIdentityWord",
            display_name="IDAdapter Identity Word",
            category=CATEGORY,
            description="One more person for IDAdapter Text Encode (or AdaFace Encode): this identity's text token on "
            "its own word, e.g. 'ohwx' in 'sks and ohwx at a cafe'. Give the same embeds to a second Apply IDAdapter "
            "with that person's attn_mask.",
            inputs=[
                IDAdapterEmbedsType.Input("embeds"),
                io.String.Input("identifier", default="ohwx", tooltip="a one-token rare word, other than the others'"),
                io.String.Input("class_noun", default="person", tooltip="woman, man, person, ..."),
                identity_words_input(),
            ],
            outputs=[IdentityWordsType.Output()],
        )

    @classmethod
    def execute(cls, embeds, identifier, class_noun, identity_words=None) -> io.NodeOutput:
        return io.NodeOutput(chained_words(identity_words, identity_word(embeds, identifier, class_noun)))


IDADAPTER_NODES = [LoadIDAdapter, IDAdapterMFFEmbed, ApplyIDAdapter, IDAdapterTextEncode, IDAdapterIdentityWord]
